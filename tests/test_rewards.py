"""Unit tests of rlhf_core.phases.rewards: VADER scores, the missing-EOS penalty and their total."""

from __future__ import annotations

import re

import pytest

from rlhf_core.errors import DataError
from rlhf_core.phases.rewards import missing_eos_penalties, score_responses, vader_scores

POSITIVE = "great and wonderful. Highly recommended!"
NEGATIVE = "This was terrible, awful and a complete waste of money. I hate it."


def test_vader_signs():
    positive, negative, empty = vader_scores([POSITIVE, NEGATIVE, ""])
    assert positive > 0.5
    assert negative < -0.5
    assert empty == 0.0
    assert all(-1.0 <= s <= 1.0 for s in (positive, negative))
    assert vader_scores([]) == []


def test_vader_is_deterministic_and_order_independent():
    assert vader_scores([NEGATIVE, POSITIVE]) == vader_scores([POSITIVE, NEGATIVE])[::-1]


def test_missing_eos_penalties():
    assert missing_eos_penalties([True, False, False, True], 0.5) == [0.0, -0.5, -0.5, 0.0]
    assert missing_eos_penalties([False], 0.0) == [-0.0]
    assert missing_eos_penalties([], 1.0) == []


def _scorer(**fields):
    from rlhf_core.config import ScorerParams, replace

    return replace(ScorerParams(), **fields)


def _score(scorers, responses, ended=None, penalty=0.0, state=None, metadata=None, lengths=None, **kwargs):
    ended = ended if ended is not None else [True] * len(responses)
    return score_responses(scorers, prompts=["p"] * len(responses), responses=responses,
                           lengths=lengths or [len(r.split()) for r in responses], ended=ended,
                           metadata=metadata or [{} for _ in responses], missing_eos_penalty=penalty, state=state,
                           where="score@r1", **kwargs)


def test_total_is_sentiment_plus_penalty():
    responses = ["", POSITIVE, NEGATIVE]
    out, _ = _score([_scorer()], responses, ended=[False, True, False], penalty=0.25)
    assert set(out) == {"task", "eos_penalty", "total"}
    vader = vader_scores(responses)
    assert out["task"] == vader
    assert out["eos_penalty"] == [-0.25, 0.0, -0.25]
    assert out["total"] == pytest.approx([-0.25, vader[1], vader[2] - 0.25], abs=1e-12)


def test_weighted_sum_with_clip_by_hand():
    # length: −|L − 4| / 4 for L = 2, 4, 10 → [−0.5, 0, −1.5], clipped to [−1, 1] → [−0.5, 0, −1]
    scorers = [_scorer(name="len", kind="length", target_length=4, weight=2.0, clip=1.0),
               _scorer(name="exact", kind="verifiable", weight=0.5)]
    out, _ = _score(scorers, ["a", "b", "c"], lengths=[2, 4, 10],
                    metadata=[{"answer": "a"}, {"answer": "x"}, {"answer": " c "}])
    assert out["len"] == [-0.5, 0.0, -1.5]
    assert out["exact"] == [1.0, 0.0, 1.0]
    # total = 2·clip(len) + 0.5·exact = [−1 + 0.5, 0, −2 + 0.5]
    assert out["total"] == pytest.approx([-0.5, 0.0, -1.5])


def test_verifiable_match_modes():
    from rlhf_core.phases.rewards import verifiable_scores

    assert verifiable_scores(["42", " 42 ", "41"], ["42", "42", "42"], "exact", 0.0) == [1.0, 1.0, 0.0]
    assert verifiable_scores(["= 42.0005 ok", "no number", "-3"], ["42", "1", "-3"], "numeric", 1e-3) == [1.0, 0.0, 1.0]
    assert verifiable_scores(["The answer is 17.", "17"], [r"answer is \d+", r"^\d{3}$"], "regex", 0.0) == [1.0, 0.0]


def test_batch_and_running_normalisation_by_hand():
    # batch: [1, 3] → mean 2, var 1 → [−1, 1]
    scorers = [_scorer(name="len", kind="length", target_length=1, normalize="batch")]
    out, _ = _score(scorers, ["x", "y"], lengths=[2, 4])  # raw −|L − 1| = [−1, −3]
    assert out["len_normalized"] == pytest.approx([1.0, -1.0], abs=1e-6)

    running = [_scorer(name="len", kind="length", target_length=1, normalize="running")]
    out1, state1 = _score(running, ["x", "y"], lengths=[2, 4])  # raw [−1, −3]: n 2, mean −2, M2 2
    assert state1 == {"len": {"count": 2, "mean": -2.0, "m2": 2.0}}
    assert out1["len_normalized"] == pytest.approx([1.0, -1.0], abs=1e-6)
    # round 2, raw [−5, −7] merged: n 4, mean −4, M2 = 2 + 2 + (−6 − −2)²·2·2/4 = 20, var 5
    out2, state2 = _score(running, ["x", "y"], lengths=[6, 8], state=state1)
    assert state2["len"] == {"count": 4, "mean": -4.0, "m2": 20.0}
    assert out2["len_normalized"] == pytest.approx([-1 / 5 ** 0.5, -3 / 5 ** 0.5], abs=1e-6)


def test_python_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, responses, metadata):\n    return [float(r.count('!')) for r in responses]\n"
        "def wrong_count(prompts, responses, metadata):\n    return [1.0]\n"
        "def boom(prompts, responses, metadata):\n    raise ValueError('bad row 3')\n"
        "def nan(prompts, responses, metadata):\n    return [0.0, float('nan')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, _ = _score([_scorer(name="bang", kind="python", function="my_rewards:shout")], ["a!", "b!!"])
    assert out["bang"] == [1.0, 2.0]
    with pytest.raises(DataError, match=r"^score@r1: scorer bad returned 1 values for 2 responses$"):
        _score([_scorer(name="bad", kind="python", function="my_rewards:wrong_count")], ["a", "b"])
    with pytest.raises(DataError, match=r"^score@r1: scorer bad raised ValueError: bad row 3$"):
        _score([_scorer(name="bad", kind="python", function="my_rewards:boom")], ["a", "b"])
    with pytest.raises(DataError, match=r"^score@r1: scorer bad returned nan for row 1"):
        _score([_scorer(name="bad", kind="python", function="my_rewards:nan")], ["a", "b"])
    with pytest.raises(DataError, match="cannot import 'no_such_module'"):
        _score([_scorer(name="bad", kind="python", function="no_such_module:f")], ["a"])


def test_evaluation_totals_skip_normalisation():
    scorers = [_scorer(name="len", kind="length", target_length=1, normalize="batch", weight=2.0)]
    out, state = _score(scorers, ["x", "y"], lengths=[2, 4], normalise_components=False)
    assert "len_normalized" not in out and state == {}
    assert out["total"] == [-2.0, -6.0]


def test_scorer_values_must_be_real_numbers(tmp_path, monkeypatch):
    """A python scorer returning the string "0.5" used to be read as 0.5; a run trained on it without a word."""
    import numpy as np

    (tmp_path / "typed_rewards.py").write_text(
        "import numpy as np, torch\n"
        "def text(prompts, responses, metadata):\n    return ['0.5' for _ in responses]\n"
        "def flags(prompts, responses, metadata):\n    return [True for _ in responses]\n"
        "def nothing(prompts, responses, metadata):\n    return [None for _ in responses]\n"
        "def numeric(prompts, responses, metadata):\n    return [1, np.float32(0.25), torch.tensor(0.5)][:len(responses)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, shown in (("text", "'0.5' (str)"), ("flags", "True (bool)"), ("nothing", "None (NoneType)")):
        with pytest.raises(DataError, match=rf"^score@r1: scorer bad returned {re.escape(shown)} for row 0; a scorer "
                                            "returns one int or float per response$"):
            _score([_scorer(name="bad", kind="python", function=f"typed_rewards:{name}")], ["a", "b"])
    out, _ = _score([_scorer(name="ok", kind="python", function="typed_rewards:numeric")], ["a", "b", "c"])
    assert out["ok"] == [1.0, 0.25, 0.5] and all(type(v) is float for v in out["ok"])
    assert np.isfinite(out["total"]).all()


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong penalty with L_max = 10, L_cache = 4: 0 up to 6 tokens, then (6 − L)/4 down to −1 at 10."""
    out, _ = _score([_scorer(name="overlong", kind="overlong", buffer=4, weight=0.5)], ["r"] * 6,
                    lengths=[3, 6, 7, 8, 9, 10], max_new_tokens=10)
    assert out["overlong"] == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0]
    assert out["total"] == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.375, -0.5])


def test_overlong_buffer_must_leave_room_below_the_limits():
    from rlhf_core.config import params_from_dict
    from rlhf_core.errors import ConfigError

    scorer = {"name": "overlong", "kind": "overlong", "buffer": 24}
    with pytest.raises(ConfigError, match=r"score.scorers\[1\] \(overlong\).buffer = 24: must be below "
                                          r"rollout.max_new_tokens \(24\)"):
        params_from_dict({"score": {"scorers": [{"name": "task", "kind": "task"}, scorer]}})
    with pytest.raises(ConfigError, match=r"must be below evaluate.max_new_tokens \(8\)"):
        params_from_dict({"score": {"scorers": [dict(scorer, buffer=8)]}, "evaluate": {"max_new_tokens": 8}})


def test_gdpo_components_keep_the_eos_penalty_size_in_its_weight():
    """The EOS penalty enters GDPO as its 0/−1 indicator weighted by missing_eos_penalty: group normalisation erases a
    column's scale, so a penalty of 0.01 and one of 5 must differ through the weight."""
    import torch

    from rlhf_core.phases.rewards import reward_components
    from rlhf_core.rl.advantages import gdpo_advantages

    scorers = [_scorer(name="task", kind="task"), _scorer(name="seen", kind="vader", weight=0.0)]
    groups = torch.tensor([0, 0, 1, 1])
    advantages = {}
    for penalty in (0.01, 5.0):
        columns = {"task": [1.0, 0.5, 0.2, 0.9], "seen": [9.0] * 4, "eos_penalty": [-penalty, 0.0, -penalty, 0.0]}
        rows, weights = reward_components(columns, scorers, penalty)
        assert rows == [[1.0, -1.0], [0.5, 0.0], [0.2, -1.0], [0.9, 0.0]] and weights == [1.0, penalty]
        advantages[penalty] = gdpo_advantages(torch.tensor(rows), weights, groups, True, 1e-6)
    assert advantages[0.01][0] > 0 > advantages[5.0][0]  # row 0: the better answer, cut off; which wins is the weight's
    assert reward_components({"task": [1.0]}, scorers, 0.0) == ([[1.0]], [1.0])  # weight 0 only monitors
