"""Unit tests of rlhf_core.rewards: VADER scores, the missing-EOS penalty and their total."""

from __future__ import annotations

import pytest

from rlhf_core.errors import DataError
from rlhf_core.rewards import missing_eos_penalties, score_responses, vader_scores

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


def test_score_responses_total_is_vader_plus_penalty():
    responses = ["", POSITIVE, NEGATIVE]
    ended = [False, True, False]
    out = score_responses("vader", responses, ended, 0.25)
    assert set(out) == {"vader", "eos_penalty", "total"}
    vader = vader_scores(responses)
    assert out["vader"] == vader
    assert out["eos_penalty"] == [-0.25, 0.0, -0.25]
    # "" scores 0 under VADER and missed EOS: 0 − 0.25
    assert out["total"][0] == pytest.approx(-0.25, abs=1e-12)
    assert out["total"][1] == pytest.approx(vader[1], abs=1e-12)
    assert out["total"][2] == pytest.approx(vader[2] - 0.25, abs=1e-12)
    assert out["total"][1] > 0.5 and out["total"][2] < -0.75


def test_score_responses_without_penalty():
    out = score_responses("vader", [POSITIVE], [False], 0.0)
    assert out["total"] == pytest.approx(out["vader"])


def test_unknown_scorer_raises():
    with pytest.raises(DataError) as info:
        score_responses("rm-7b", ["x"], [True], 0.0)
    assert "'rm-7b'" in str(info.value) and "vader" in str(info.value)
