"""Unit tests of rlhf_core.config: loading, validation messages, derived values and the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_core.config import (
    MOVED,
    OptimParams,
    Params,
    PPOParams,
    RoundParams,
    flatten,
    load_params,
    params_from_dict,
    replace,
    yaml_load,
)
from rlhf_core.config.rendering import render_params_yaml, schema_rows
from rlhf_core.errors import ConfigError
from rlhf_core.rl.algorithms import registry

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# -- loading ----------------------------------------------------------------------------------------

def test_repo_params_yaml_loads():
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    raw = yaml.safe_load(PARAMS_YAML.read_text())
    assert params.seed == raw["seed"]
    assert params.ppo.clip_range == pytest.approx(float(raw["ppo"]["clip_range"]))
    assert list(params.rounds) == list(raw["rounds"])
    assert all(isinstance(spec, RoundParams) for spec in params.rounds.values())


def test_defaults_round_trip_through_render():
    text = render_params_yaml()
    parsed = params_from_dict(yaml.safe_load(text))
    assert parsed == Params()
    assert parsed.hash() == Params().hash()


def test_repo_params_round_trip_through_render():
    params = load_params(PARAMS_YAML)
    assert params_from_dict(yaml.safe_load(render_params_yaml(params))) == params


def test_render_documents_every_key():
    text = render_params_yaml()
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#") and not line.strip().startswith("rounds:") \
                and "{from:" not in line and not line.strip().startswith("- {name:"):
            assert "  # " in line, line


def test_empty_mapping_gives_defaults():
    assert params_from_dict({}) == Params()


def test_non_default_values_are_read():
    params = params_from_dict({"seed": 7, "optim": {"epochs": 2}, "ppo": {"target_kl": None},
                               "algorithm": {"critic": "separate"}, "sft": {"tiny": {"hidden_size": 64, "num_heads": 8}}})
    assert params.seed == 7
    assert params.optim.epochs == 2 and params.ppo.target_kl is None and params.algorithm.critic == "separate"
    assert params.sft.tiny.hidden_size == 64 and params.sft.tiny.num_heads == 8
    # an int where a float is expected becomes a float
    assert params_from_dict({"ppo": {"clip_range": 1}}).ppo.clip_range == 1.0
    assert isinstance(params_from_dict({"ppo": {"clip_range": 1}}).ppo.clip_range, float)


def test_float_from_string_is_accepted():
    assert params_from_dict({"optim": {"lr": "1e-5"}}).optim.lr == pytest.approx(1e-5)
    assert params_from_dict({"optim": {"adam_eps": "1e-8"}}).optim.adam_eps == pytest.approx(1e-8)


def test_yaml_exponent_without_dot_is_accepted(tmp_path):
    # YAML 1.1 reads `1e-5` as a string
    path = tmp_path / "params.yaml"
    path.write_text("optim:\n  lr: 1e-5\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "1e-5"
    assert load_params(path).optim.lr == pytest.approx(1e-5)


# -- errors -----------------------------------------------------------------------------------------

def test_unknown_top_level_key():
    message = _error({"sede": 1})
    assert message.startswith("sede: unknown key")
    assert "seed" in message


def test_unknown_nested_key():
    message = _error({"ppo": {"clip_rang": 0.1}})
    assert message.startswith("ppo.clip_rang: unknown key")
    assert "clip_range" in message


def test_unknown_deeply_nested_key():
    assert _error({"sft": {"tiny": {"hiden_size": 64}}}).startswith("sft.tiny.hiden_size: unknown key")


def test_unknown_key_inside_a_round():
    assert _error({"rounds": {"r1": {"form": "sft"}}}).startswith("rounds.r1.form: unknown key")


@pytest.mark.parametrize("raw, key, words", [
    ({"optim": {"epochs": "four"}}, "optim.epochs", "integer"),
    ({"optim": {"epochs": True}}, "optim.epochs", "integer"),
    ({"optim": {"epochs": 4.0}}, "optim.epochs", "integer"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "number"),
    ({"optim": {"lr": True}}, "optim.lr", "number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "finite"),
    ({"kl": {"adaptive": "yes"}}, "kl.adaptive", "true or false"),
    ({"kl": {"adaptive": 1}}, "kl.adaptive", "true or false"),
    ({"score": {"scorers": [{"name": "rm", "kind": "hf_classifier", "model": ["a", 3]}]}}, "score.scorers[0].model[1]",
     "must be a string"),
    ({"score": {"scorers": [{"name": "rm", "kind": "hf_classifier", "model": 3}]}}, "score.scorers[0].model", "must be a list"),
    ({"tracking": {"experiment": 5}}, "tracking.experiment", "string"),
    ({"seed": "0"}, "seed", "integer"),
])
def test_wrong_type(raw, key, words):
    message = _error(raw)
    assert message.startswith(f"{key} = ")
    assert words in message


@pytest.mark.parametrize("raw, key, words", [
    ({"ppo": {"clip_range": -0.1}}, "ppo.clip_range", "> 0"),
    ({"ppo": {"clip_range": 0}}, "ppo.clip_range", "> 0"),
    ({"rollout": {"top_p": 1.5}}, "rollout.top_p", "<= 1"),
    ({"rollout": {"top_k": -1}}, "rollout.top_k", ">= 0"),
    ({"prepare": {"eval_fraction": 1.0}}, "prepare.eval_fraction", "< 1"),
    ({"advantages": {"gamma": 1.01}}, "advantages.gamma", "<= 1"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"sft": {"tiny": {"vocab_size": 100}}}, "sft.tiny.vocab_size", ">= 300"),
    ({"ppo": {"target_kl": 0.0}}, "ppo.target_kl", "> 0"),
])
def test_out_of_range(raw, key, words):
    message = _error(raw)
    assert message.startswith(f"{key} = ")
    assert words in message


@pytest.mark.parametrize("raw, key", [
    ({"algorithm": {"critic": "foo"}}, "algorithm.critic"),
    ({"algorithm": {"name": "sac"}}, "algorithm.name"),
    ({"optim": {"loss_aggregation": "sum"}}, "optim.loss_aggregation"),
    ({"rloo": {"objective": "dpo"}}, "rloo.objective"),
    ({"optim": {"lr_schedule": "exponential"}}, "optim.lr_schedule"),
    ({"kl": {"reward_estimator": "k2"}}, "kl.reward_estimator"),
    ({"prepare": {"too_long": "cut"}}, "prepare.too_long"),
    ({"task": "math"}, "task"),
])
def test_bad_literal(raw, key):
    message = _error(raw)
    assert message.startswith(f"{key} = ")
    assert "must be one of" in message


def test_bad_literal_lists_the_allowed_values():
    message = _error({"algorithm": {"critic": "foo"}})
    assert "'value_head'" in message and "'separate'" in message and "'foo'" in message


def test_pattern_field():
    assert params_from_dict({"device": "cuda:1"}).device == "cuda:1"
    assert _error({"device": "gpu"}).startswith("device = 'gpu'")


def test_section_must_be_a_mapping():
    assert _error({"ppo": 3}) == "ppo = 3: must be a mapping of keys to values"


def test_round_from_a_later_round():
    message = _error({"rounds": {"r1": {"from": "r2"}, "r2": {"from": "sft"}}})
    assert message.startswith("rounds.r1.from = 'r2'")


def test_round_from_an_unknown_round():
    message = _error({"rounds": {"r1": {"from": "sft"}, "r2": {"from": "r9"}}})
    assert message.startswith("rounds.r2.from = 'r9'")


@pytest.mark.parametrize("rounds, start", [
    ({}, "rounds is empty"),
    ({"sft": {"from": "sft"}}, "rounds.sft"),
    ({"r 1": {"from": "sft"}}, "rounds: the key 'r 1' must match ^[A-Za-z][A-Za-z0-9_-]*$"),
    ([["r1", "sft"]], "rounds = [['r1', 'sft']]: must be a mapping"),
])
def test_bad_rounds(rounds, start):
    assert _error({"rounds": rounds}).startswith(start)


def test_micro_batch_larger_than_minibatch():
    message = _error({"optim": {"micro_batch_size": 32, "minibatch_size": 16}})
    assert message.startswith("optim.micro_batch_size = 32")
    assert "optim.minibatch_size" in message
    # equal is fine
    assert params_from_dict({"optim": {"micro_batch_size": 16, "minibatch_size": 16}}).optim.micro_batch_size == 16


def test_heads_must_divide_hidden_size():
    message = _error({"sft": {"tiny": {"hidden_size": 130, "num_heads": 4}}})
    assert message.startswith("sft.tiny.num_heads = 4")
    assert "sft.tiny.hidden_size" in message and "130" in message


def test_path_required_for_file_sources():
    assert _error({"prepare": {"source": "file"}}).startswith("prepare.path is empty")
    assert _error({"sft": {"demonstrations": "hf"}}).startswith("sft.demo_path is empty")


def test_builtin_model_needs_sft_epochs():
    assert _error({"sft": {"epochs": 0}}).startswith("sft.epochs = 0")


def test_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("optim:\n  lr: [0.1\n  epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "not valid YAML" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "not found" in message


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_config_error_is_raised_for_a_file_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ppo:\n  clip_range: -0.1\n")
    with pytest.raises(ConfigError, match=r"^ppo\.clip_range = -0\.1: must be > 0"):
        load_params(path)


# -- derived values ---------------------------------------------------------------------------------

def _chained() -> Params:
    return params_from_dict({"rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}, "b1": {"from": "r1"},
                                        "r3": {"from": "r2"}}})


def test_round_index():
    params = _chained()
    assert params.round_index("sft") == 0
    assert params.round_index("r1") == 1
    assert params.round_index("r2") == 2
    assert params.round_index("b1") == 2
    assert params.round_index("r3") == 3
    with pytest.raises(ConfigError, match="r9"):
        params.round_index("r9")


def test_round_seed_differs_by_round_and_stage_and_is_stable():
    params = _chained()
    seeds = {(r, s): params.round_seed(r, s) for r in ("r1", "r2", "r3") for s in ("rollout", "optimize")}
    assert len(set(seeds.values())) == len(seeds)
    assert all(isinstance(v, int) and 0 <= v < 2 ** 32 for v in seeds.values())
    # the same on a fresh instance, and pinned: it must not depend on the process (e.g. hash randomisation)
    assert _chained().round_seed("r1", "rollout") == seeds[("r1", "rollout")]
    assert params.round_seed("r1", "rollout") == 2577043068
    assert params.round_seed("r2", "rollout") == 911937127
    assert params.round_seed("r1", "optimize") == 1378720533
    # and it follows the global seed
    other = replace(params, seed=1)
    assert other.round_seed("r1", "rollout") != seeds[("r1", "rollout")]


def test_to_dict_uses_yaml_key_from():
    tree = _chained().to_dict()
    assert tree["rounds"]["r2"] == {"from": "r1"}
    assert tree["ppo"]["clip_range"] == 0.2
    assert params_from_dict(tree) == _chained()


def test_hash_changes_with_a_param():
    assert Params().hash() != params_from_dict({"optim": {"lr": 2e-4}}).hash()
    assert Params().hash() == Params().hash()


def test_flatten():
    tree = {"ppo": {"lr": 1, "x": {"y": 2}}, "a": {}, "seed": 0}
    assert flatten(tree) == {"ppo.lr": 1, "ppo.x.y": 2, "a": {}, "seed": 0}
    assert flatten({"a": 1}, prefix="p.") == {"p.a": 1}


# -- schema -----------------------------------------------------------------------------------------

def test_schema_rows_cover_every_leaf():
    rows = schema_rows()
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys))
    assert "ppo.clip_range" in keys and "sft.tiny.num_heads" in keys and "rounds" in keys
    by_key = {row[0]: row for row in rows}
    assert by_key["ppo.clip_range"][2] == 0.2
    assert by_key["algorithm.critic"][1] == "one of 'value_head', 'separate'"
    assert by_key["ppo.target_kl"][1] == "a number or null"
    assert all(row[3] for row in rows)
    assert len([k for k in keys if k.startswith("ppo.")]) == len(PPOParams.model_fields)
    assert len([k for k in keys if k.startswith("optim.")]) == len(OptimParams.model_fields)


def test_params_yaml_keys_are_exactly_the_schema_keys():
    raw = yaml.safe_load(PARAMS_YAML.read_text())
    # list items and mapping entries (scorers[], reward_models.<name>) have their own rows
    schema_keys = {row[0] for row in schema_rows() if "[]." not in row[0] and ".<name>." not in row[0]}
    assert set(raw) == {key.split(".")[0] for key in schema_keys}
    flat = flatten(raw)
    yaml_keys = {key for key in flat if not key.startswith("rounds.")}
    assert yaml_keys == schema_keys - {"rounds"}
    # every round is exactly {from: ...}
    assert isinstance(raw["rounds"], dict) and raw["rounds"]
    for key, spec in raw["rounds"].items():
        assert set(spec) == {"from"}, key


def test_every_example_params_file_validates():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("params*.yaml"))
    assert examples
    for path in examples:
        load_params(path)


def test_micro_batch_must_divide_minibatch():
    message = _error({"optim": {"micro_batch_size": 24, "minibatch_size": 64}})
    assert message == "optim.micro_batch_size = 24: must divide optim.minibatch_size (64)"


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_methods_need_two_samples_per_prompt(name):
    message = _error({"algorithm": {"name": name}, "rollout": {"samples_per_prompt": 1}})
    assert message.startswith("rollout.samples_per_prompt = 1: ") and "at least 2" in message


@pytest.mark.parametrize(("raw", "words"), [
    ({"ppo": {"dual_clip": 1.0}}, "must be > 1.0"),
    ({"trpo": {"max_kl": 0}}, "must be > 0.0"),
    ({"trpo": {"backtrack_fraction": 1.0}}, "must be < 1.0"),
    ({"kl": {"loss_coef": -0.1}}, "must be >= 0.0"),
    ({"reinforce": {"baseline_momentum": 1.0}}, "must be < 1.0"),
])
def test_algorithm_params_are_range_checked(raw, words):
    assert words in _error(raw)


@pytest.mark.parametrize(("scorers", "extra", "start"), [
    ([], {}, "score.scorers is empty"),
    ({"name": "x"}, {}, "score.scorers = {'name': 'x'}: must be a list"),
    ([{"name": "a"}, {"name": "a", "kind": "length"}], {}, "score.scorers: names must be unique"),
    ([{"name": "f", "kind": "python", "function": "just_a_module"}], {}, "score.scorers[0] (f).function = 'just_a_module'"),
    ([{"name": "v", "kind": "verifiable"}], {}, "score.scorers[0] (v): a verifiable scorer needs reference answers: prepare.answer_field"),
    ([{"name": "s", "kind": "bleu"}], {}, "score.scorers[0].kind = 'bleu': must be one of"),
    ([{"name": "s", "wieght": 2}], {}, "score.scorers[0].wieght: unknown key"),
    ([{"name": "s", "clip": 0}], {}, "score.scorers[0].clip = 0: must be > 0.0"),
    ([{"name": "2bad"}], {}, "score.scorers[0].name = '2bad': must match"),
])
def test_bad_scorers(scorers, extra, start):
    assert _error({"score": {"scorers": scorers}, **extra}).startswith(start)


def test_verifiable_scorer_with_an_answer_field_is_accepted():
    params = params_from_dict({"prepare": {"source": "file", "path": "p.jsonl", "answer_field": "answer"},
                               "score": {"scorers": [{"name": "acc", "kind": "verifiable", "match": "numeric"}]}})
    assert params.score.scorers[0].match == "numeric"


def test_unquoted_no_survives_dvc_rewriting_params_yaml(tmp_path):
    """`dvc exp run -S …` writes `mixed_precision: no` without quotes; YAML 1.1 reads that as false."""
    assert yaml.safe_load("compute:\n  mixed_precision: no\n")["compute"]["mixed_precision"] is False
    (tmp_path / "params.yaml").write_text("compute:\n  mixed_precision: no\noptim:\n  lr: 1e-5\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.compute.mixed_precision == "no" and params.optim.lr == 1e-5
    assert yaml_load("a: no\nb: yes\nc: off\nd: true\ne: False\nf: 1e-5\ng: 3\n") == {
        "a": "no", "b": "yes", "c": "off", "d": True, "e": False, "f": 1e-5, "g": 3}
    with pytest.raises(ConfigError, match="must be one of 'no', 'bf16', 'fp16'"):
        params_from_dict({"compute": {"mixed_precision": True}})


def test_a_value_an_algorithm_would_silently_drop_is_an_error_naming_both_keys():
    """grpo used to replace ppo.kl_loss_coef with grpo.kl_coef and ignore advantages.kl_coef without a word; now there
    is one KL loss weight (kl.loss_coef) for every algorithm, and a KL an algorithm cannot use is refused."""
    with pytest.raises(ConfigError, match=r"^kl.reward_coef = 0.05: algorithm.name = 'grpo' puts no KL in the reward "
                                          r".*set kl.reward_coef: auto \(or 0\)"):
        params_from_dict({"algorithm": {"name": "grpo"}, "kl": {"reward_coef": 0.05}})  # set by hand: refused
    grpo = params_from_dict({"algorithm": {"name": "grpo"}, "kl": {"reward_coef": 0, "loss_coef": 0.04}})
    assert grpo.kl.loss_coef == 0.04 and grpo.kl.loss_estimator == "k3"
    with pytest.raises(ConfigError, match=r"^kl.loss_coef = 0.1: algorithm.name = 'trpo' has no KL loss term"):
        params_from_dict({"algorithm": {"name": "trpo"}, "kl": {"loss_coef": 0.1}})
    with pytest.raises(ConfigError, match=r"^kl.adaptive: adapts kl.reward_coef, which is 0"):
        params_from_dict({"kl": {"adaptive": True, "reward_coef": 0}})
    assert params_from_dict({"kl": {"loss_coef": 0.1}}).kl.loss_coef == 0.1  # ppo uses both
    with pytest.raises(ConfigError, match=r"^optim.carry_state: algorithm.name = 'npg' takes no AdamW step"):
        params_from_dict({"algorithm": {"name": "npg"}, "optim": {"carry_state": True}})


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_key_that_moved_is_one_line_naming_its_new_place(old, new):
    section, name = old.split(".")
    assert _error({section: {name: 1}}) == (f"{old}: moved to {new} (what every algorithm's update loop uses is in "
                                            "optim:, every KL setting in kl:)")


def test_every_moved_key_names_a_key_that_exists():
    keys = {row[0] for row in schema_rows()}
    assert set(MOVED.values()) <= keys
    assert not set(MOVED) & keys


def test_shared_update_settings_live_only_in_optim():
    """One place per knob: no section but optim holds the update loop's settings, none but kl a KL weight."""
    shared = set(OptimParams.model_fields)
    for row in schema_rows():
        section, _, name = row[0].rpartition(".")
        if section not in ("optim", "sft", "reward_models.<name>", "score.scorers[]", "evaluate", "rollout"):
            assert name not in shared, row[0]
        if section != "kl":
            assert "kl_coef" not in name and "kl_loss" not in name, row[0]


def test_replace_validates_like_params_yaml():
    assert replace(OptimParams(), lr=1).lr == 1.0
    with pytest.raises(ConfigError, match=r"^lr = -1: must be > 0.0"):
        replace(OptimParams(), lr=-1)
    with pytest.raises(ConfigError, match=r"^clip_range: unknown key; allowed keys are adam_eps, "):
        replace(OptimParams(), clip_range=0.1)


@pytest.mark.parametrize(("kl", "uses"), [({"reward_coef": 0.05}, True), ({"reward_coef": 0.0, "loss_coef": 0.04}, True),
                                          ({"reward_coef": 0.0}, False),
                                          ({"reward_coef": 0.0, "monitor": True}, True)])
def test_the_reference_is_used_only_by_a_kl_term_or_the_monitor(kl, uses):
    assert params_from_dict({"kl": kl}).uses_reference is uses


def test_rollout_correction_resolves_and_refuses_what_it_cannot_apply():
    assert params_from_dict({}).sampler_correction == "none"  # hf: the sampler is the trainer, nothing recorded
    assert params_from_dict({"rollout": {"record_sampler_logprobs": True}}).sampler_correction == "tis"
    vllm = {"engine": "vllm"}
    assert params_from_dict({"rollout": vllm, "compute": {"rollout_processes": 1}}).sampler_correction == "tis"
    assert params_from_dict({"rollout": {**vllm, "record_sampler_logprobs": False},
                             "compute": {"rollout_processes": 1}}).sampler_correction == "none"
    assert params_from_dict({"rollout": {"record_sampler_logprobs": True},
                             "algorithm": {"name": "trpo"}}).sampler_correction == "none"  # auto: no per-token loss
    with pytest.raises(ConfigError, match=r"^rollout_correction.mode = 'mis': needs the sampler's log-probs, which "
                                          r"rollout.engine = 'hf' does not store"):
        params_from_dict({"rollout_correction": {"mode": "mis"}})
    with pytest.raises(ConfigError, match=r"^rollout_correction.mode = 'tis': algorithm.name = 'npg' has no per-token"):
        params_from_dict({"rollout": {"record_sampler_logprobs": True}, "rollout_correction": {"mode": "tis"},
                          "algorithm": {"name": "npg"}})
    with pytest.raises(ConfigError, match=r"^rollout_correction.mis_low = 0.8: unused, the correction is 'tis'"):
        params_from_dict({"rollout": {"record_sampler_logprobs": True}, "rollout_correction": {"mis_low": 0.8}})
    with pytest.raises(ConfigError, match=r"^rollout_correction.level = 'sequence': unused, the correction is 'none'"):
        params_from_dict({"rollout_correction": {"level": "sequence"}})


def test_dynamic_sampling_needs_groups_and_oversample_needs_dynamic_sampling():
    rloo = {"algorithm": {"name": "rloo"}}
    assert params_from_dict({**rloo, "advantages": {"dynamic_sampling": True}, "rollout": {"oversample": 1.5}}
                            ).prompt_groups_per_round == 96  # ceil(64 × 1.5)
    with pytest.raises(ConfigError, match=r"^rollout.oversample = 2.0: refills the groups that "
                                          r"advantages.dynamic_sampling drops, which is off"):
        params_from_dict({"rollout": {"oversample": 2.0}})
    with pytest.raises(ConfigError, match=r"^rollout.samples_per_prompt = 1: rloo compares the samples"):
        params_from_dict({**rloo, "advantages": {"dynamic_sampling": True}, "rollout": {"samples_per_prompt": 1}})


def test_gdpo_needs_group_advantages_and_raw_components():
    grpo = {"algorithm": {"name": "grpo"}, "kl": {"reward_coef": 0}}
    assert params_from_dict({**grpo, "grpo": {"normalize": "components"}}).grpo.normalize == "components"
    with pytest.raises(ConfigError, match=r"^grpo.normalize = 'components': algorithm.name = 'ppo' has no group-"):
        params_from_dict({"grpo": {"normalize": "components"}})
    scorers = [{"name": "task", "kind": "task", "normalize": "running"}]
    with pytest.raises(ConfigError, match=r"^score.scorers\[0\] \(task\): normalize = 'running', clip = null: "
                                          r"grpo.normalize = 'components' normalises each component"):
        params_from_dict({**grpo, "grpo": {"normalize": "components"}, "score": {"scorers": scorers}})
    with pytest.raises(ConfigError, match=r"^grpo.normalize = 'components': every scorer of score.scorers has weight 0"):
        params_from_dict({**grpo, "grpo": {"normalize": "components"},
                          "score": {"scorers": [{"name": "task", "kind": "task", "weight": 0.0}]}})


def test_an_algorithm_sections_values_are_refused_under_another_algorithm():
    with pytest.raises(ConfigError, match=r"^cispo.max_weight = 3.0: algorithm.name = 'ppo' does not read the cispo"):
        params_from_dict({"cispo": {"max_weight": 3.0}})
    with pytest.raises(ConfigError, match=r"^sapo.tau_neg = 2.0: algorithm.name = 'grpo' does not read the sapo"):
        params_from_dict({"algorithm": {"name": "grpo"}, "kl": {"reward_coef": 0}, "sapo": {"tau_neg": 2.0}})
    with pytest.raises(ConfigError, match=r"^ppo.clip_range = 0.1: algorithm.name = 'sapo' has no clipped objective"):
        params_from_dict({"algorithm": {"name": "sapo"}, "kl": {"reward_coef": 0}, "ppo": {"clip_range": 0.1}})
    with pytest.raises(ConfigError, match=r"^advantages.whiten_advantages = false: reinforce_pp's batch normalisation"):
        params_from_dict({"algorithm": {"name": "reinforce_pp"}, "advantages": {"whiten_advantages": False}})
    with pytest.raises(ConfigError, match=r"^advantages.dynamic_sampling: algorithm.name = 'ppo' has no group baseline"):
        params_from_dict({"advantages": {"dynamic_sampling": True}})
    assert params_from_dict({"algorithm": {"name": "reinforce_pp"}, "reinforce_pp": {"baseline": "group_mean"},
                             "advantages": {"dynamic_sampling": True}}).advantages.dynamic_sampling


@pytest.mark.parametrize("name", list(registry.ALGORITHMS))
def test_one_switch_picks_the_algorithm_and_auto_resolves_its_kl(name):
    """`dvc exp run -S algorithm.name=X` alone: the default params with only the name changed are valid for every
    registered algorithm, and kl.reward_coef / kl.loss_coef `auto` become the algorithm's own (Traits.kl_defaults):
    0.05 in the reward where the KL may go there, 0 for the group-relative ones (which stopped at the first stage
    with `kl.reward_coef = 0.05 …` before)."""
    raw = yaml_load(PARAMS_YAML.read_text())
    raw["algorithm"]["name"] = name
    params = params_from_dict(raw)
    traits = registry.get(name).traits
    assert params.kl.reward_coef == "auto" and params.kl.loss_coef == "auto"
    assert (params.kl_reward_coef, params.kl_loss_coef) == traits.kl_defaults
    assert params.kl_reward_coef == (0.05 if traits.kl_in_reward else 0.0)
    assert params.auto_resolved == {"reward_coef": traits.kl_defaults[0], "loss_coef": traits.kl_defaults[1]}
    assert params.uses_reference == (params.kl_reward_coef > 0)  # KL-free where auto gives no KL at all


def test_auto_or_a_number_is_one_line():
    with pytest.raises(ConfigError, match=r"^kl.reward_coef = -1: must be >= 0.0 or auto$"):
        params_from_dict({"kl": {"reward_coef": -1}})
    with pytest.raises(ConfigError, match=r"^kl.loss_coef = 'some': must be a number or auto$"):
        params_from_dict({"kl": {"loss_coef": "some"}})
    explicit = params_from_dict({"kl": {"reward_coef": 0.1, "loss_coef": "2e-2"}})
    assert (explicit.kl_reward_coef, explicit.kl_loss_coef, explicit.auto_resolved) == (0.1, 0.02, {})


RULE_CASES = [  # (rule, params that break it and no rule before it, the start of its one line)
    ("rule_shapes_and_batching", {"sft": {"tiny": {"hidden_size": 66}}}, "sft.tiny.num_heads = 4: must divide"),
    ("rule_group_baseline", {"algorithm": {"name": "grpo"}, "rollout": {"samples_per_prompt": 1}},
     "rollout.samples_per_prompt = 1: grpo compares the samples of a prompt"),
    ("rule_component_normalisation", {"grpo": {"normalize": "components"}},
     "grpo.normalize = 'components': algorithm.name = 'ppo' has no group-normalised advantages (grpo, cispo, sapo do)"),
    ("rule_own_sections", {"sapo": {"tau_pos": 2.0}}, "sapo.tau_pos = 2.0: algorithm.name = 'ppo' does not read"),
    ("rule_objective_options", {"algorithm": {"name": "reinforce"}, "ppo": {"dual_clip": 3.0}},
     "ppo.dual_clip = 3.0: algorithm.name = 'reinforce' has no clipped objective (ppo, grpo, reinforce_pp, and rloo"),
    ("rule_kl", {"algorithm": {"name": "npg"}, "kl": {"loss_coef": 0.1}}, "kl.loss_coef = 0.1: algorithm.name = 'npg'"),
    ("rule_launcher", {"compute": {"num_machines": 2}},
     "compute.num_machines = 2: several machines run on a Ray cluster; set compute.launcher: ray"),
    ("rule_trust_region", {"algorithm": {"name": "trpo"}, "compute": {"num_machines": 2, "launcher": "ray"}},
     "compute.num_machines = 2: trpo runs in one process; set compute.num_machines: 1 or choose reinforce, a2c, ppo, "),
    ("rule_data_sources", {"sft": {"demonstrations": "hf"}}, "sft.demo_path is empty"),
    ("rule_scorers", {"score": {"scorers": [{"name": "x", "kind": "python", "function": "nope"}]}},
     "score.scorers[0] (x).function = 'nope': must be `module:function`"),
    ("rule_precision_and_strategy", {"compute": {"zero_stage": 2}}, "compute.zero_stage = 2: only read with"),
    ("rule_deepspeed", {"compute": {"strategy": "deepspeed", "num_processes": 2}, "algorithm": {"critic_warmup_epochs": 1}},
     "algorithm.critic_warmup_epochs = 1: not supported with compute.strategy = 'deepspeed'"),
    ("rule_vllm", {"vllm": {"host": "0.0.0.0"}}, "vllm.host = '0.0.0.0': must be a loopback address"),
    ("rule_critic", {"algorithm": {"name": "grpo", "critic_init": "reward_models/bt"}},
     "algorithm.critic_init = 'reward_models/bt': algorithm.name = 'grpo' trains no critic"),
    ("rule_critic_warmup_and_lora", {"algorithm": {"critic_warmup_epochs": 1}, "optim": {"vf_coef": 0.0}},
     "algorithm.critic_warmup_epochs = 1: optim.vf_coef is 0"),
    ("rule_environment", {"environment": {"max_turns": 2}}, "environment.max_turns = 2: read only with an environment"),
    ("rule_rollout_correction", {"rollout_correction": {"tis_cap": 3.0}}, "rollout_correction.tis_cap = 3.0: unused"),
    ("rule_rounds", {"rounds": {"r1": {"from": "r0"}}}, "rounds.r1.from = 'r0': must be `sft` or a round"),
]


@pytest.mark.parametrize(("rule", "raw", "message"), RULE_CASES, ids=[case[0] for case in RULE_CASES])
def test_each_rule_refuses_its_case_in_one_line(rule, raw, message):
    """Params.validate was one 186-line function; each of its rules is now a named function (config/rules.py) that
    refuses its own case, asking the algorithm's traits, and the whole validation stops at that line."""
    import re

    from rlhf_core.config import rules
    from rlhf_core.config.sections import Params

    unchecked = Params.model_validate(raw)  # the tree alone, no cross-field rule run yet
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        getattr(rules, rule)(unchecked)
    for earlier in rules.RULES[:rules.RULES.index(getattr(rules, rule))]:
        earlier(unchecked)  # the case breaks no rule before its own
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        params_from_dict(raw)


def test_every_rule_has_its_case():
    from rlhf_core.config import rules

    assert [case[0] for case in RULE_CASES] == [rule.__name__ for rule in rules.RULES]
