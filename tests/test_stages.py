"""Stage scripts as a user runs them: bad params fail in one line, and the Hugging Face paths
(local model directory, local files) work with nothing but params changed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, evaluate_all

from rlhf_core.config import load_params
from rlhf_core.errors import ConfigError
from rlhf_core.rl.algorithms import registry


def run_stage_process(stage: str, cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)


@pytest.mark.parametrize(("change", "message"), [
    ({"ppo": {"clip_range": -1}}, "error: rollout@r1: ppo.clip_range = -1: must be > 0.0"),
    ({"rollout": {"tempreature": 1}}, "error: rollout@r1: rollout.tempreature: unknown key; allowed keys are"),
    ({"rollout": {"max_new_tokens": "many"}}, "error: rollout@r1: rollout.max_new_tokens = 'many': must be an integer"),
    ({"rounds": {"r1": {"from": "r2"}, "r2": {"from": "r1"}}}, "error: rollout@r1: rounds.r1.from = 'r2': must be `sft`"),
])
def test_bad_params_stop_the_stage_with_one_line(tmp_path, change, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in change.items():
        if section == "rounds":
            raw["rounds"] = values
        else:
            raw[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_stage_process("rollout", tmp_path, "--round", "r1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "rollouts").exists()


def test_unknown_round_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = run_stage_process("score", tmp_path, "--round", "r9")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: score@r9: --round 'r9': not in params rounds")


def test_missing_input_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = run_stage_process("score", tmp_path, "--round", "r1")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: score@r1: rollouts/r1/rollouts.parquet: file not found; "
                                     "run the stage that produces it first (dvc repro)")


def test_hf_model_directory_and_local_files_through_every_stage(tmp_path, tiny_checkpoint, monkeypatch):
    """sft.model = a local HF directory (as a hub id would be), snapshotted with epochs 0; prompts and
    demonstrations from local files.  The tokenizer's pad == EOS, so the snapshot must add a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_core.phases.tasks import sentiment
    from stages import advantages, optimize, prepare, rollout, score, sft

    model_dir = tmp_path / "hf-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model_dir)
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(model_dir)

    work = tmp_path / "work"
    work.mkdir()
    pd.DataFrame({"question": [r["prompt"] for r in sentiment.prompts(60, seed=5)]}).to_json(work / "prompts.jsonl", orient="records",
                                                                       lines=True)
    pd.DataFrame(sentiment.demonstrations(40, seed=5)).rename(columns={"response": "answer"}).to_csv(
        work / "demos.csv", index=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"].update(source="file", path="prompts.jsonl", prompt_field="question")
    raw["sft"].update(model=str(model_dir), epochs=0, demonstrations="file", demo_path="demos.csv",
                      demo_response_field="answer")
    raw["rollout"].update(prompts_per_round=8, samples_per_prompt=2, max_new_tokens=8)
    raw["optim"].update(epochs=1, minibatch_size=8, micro_batch_size=4)
    raw["algorithm"]["critic"] = "separate"
    raw["evaluate"].update(num_prompts=4, samples_per_prompt=1, max_new_tokens=8, num_perplexity_texts=5)
    raw["kl"].update(adaptive=True, reward_coef=0.2, target=0.01, horizon=100)
    raw["rounds"] = {"r1": {"from": "sft"}, "r2": {"from": "r1"}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    params = load_params("params.yaml")
    no_round, round_one = argparse.Namespace(), argparse.Namespace(round="r1")

    prepare.main(params, no_round)
    assert json.loads((work / "metrics/prepare.json").read_text())["prompts_read"] == 60
    sft.main(params, no_round)
    snapshot = AutoTokenizer.from_pretrained(work / "models/sft")
    assert snapshot.pad_token_id != snapshot.eos_token_id
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, round_one)
    assert (work / "models/r1/critic/value_head.safetensors").is_file()

    # The adaptive KL controller's state travels r1 → models/r1 → r2.
    r1_advantages = json.loads((work / "metrics/r1/advantages.json").read_text())
    assert r1_advantages["kl_coef"] == 0.2  # round 1 starts from the param (sft has no state)
    # round 1's KL is 0 (π = π_ref), far below the target: the clipped error −0.2 shrinks β by 16/100·0.2
    assert r1_advantages["kl_coef_next"] == pytest.approx(0.2 * (1 - 0.2 * 16 / 100))
    carried = json.loads((work / "models/r1/rlhf_state.json").read_text())["kl_coef"]
    assert carried == r1_advantages["kl_coef_next"]
    round_two = argparse.Namespace(round="r2")
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, round_two)
    assert json.loads((work / "metrics/r2/advantages.json").read_text())["kl_coef"] == carried

    # A stage imports only what it needs: score (built-in VADER scorer) neither torch nor transformers,
    # advantages no transformers, and neither loads MLflow (only track does).
    for stage, absent in (("score", {"torch", "transformers", "mlflow"}), ("advantages", {"transformers", "mlflow"})):
        code = (f"import runpy, sys; sys.argv = ['{stage}', '--round', 'r2']; "
                f"runpy.run_module('stages.{stage}', run_name='__main__'); print(' '.join(sorted(sys.modules)))")
        result = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        assert "pandas" in result.stdout.split() and not absent & set(result.stdout.split()), (stage, result.stdout)

    evaluate_all(params)
    evaluation = json.loads((work / "metrics/eval.json").read_text())
    assert set(evaluation) == {"sft", "r1", "r2"}
    assert evaluation["sft"]["kl"] == 0.0
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert summary == {"checkpoint": "r2", **evaluation["r2"],
                       "reward_gain": pytest.approx(evaluation["r2"]["reward"] - evaluation["sft"]["reward"])}


def run_two_rounds(tmp_path, tiny_checkpoint, monkeypatch, name: str, **changes) -> None:
    """prepare, sft, then rollout → score → advantages → optimize for r1 and r2, and evaluate, with algorithm.name
    ``name`` on the tiny checkpoint (``small_round_params``); ``changes``: {section: {key: value}} on top."""
    from stages import advantages, optimize, prepare, rollout, score, sft

    changes = {**changes, "algorithm": {"name": name, **changes.get("algorithm", {})},
               "trpo": {"critic_epochs": 1, **changes.get("trpo", {})}}
    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, **changes)
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    for round_key in ("r1", "r2"):
        for stage in (rollout, score, advantages, optimize):
            stage.main(params, argparse.Namespace(round=round_key))
    evaluate_all(params)


@pytest.mark.parametrize("algorithm", list(registry.ALGORITHMS))
def test_every_algorithm_runs_the_round_stages(tmp_path, tiny_checkpoint, monkeypatch, algorithm):
    """advantages → optimize → rollout of the next round → evaluate, for each registered algorithm.name, with the
    options its traits allow: a KL loss term where the KL cannot go in the reward (GRPO's paper: 0.04), AdamW's state
    carried from round to round where it takes AdamW steps, a critic warm-up where optim's loop trains a critic."""
    traits = registry.get(algorithm).traits
    carry, warmup = traits.first_order, traits.trains_critic
    run_two_rounds(tmp_path, tiny_checkpoint, monkeypatch, algorithm,
                   kl={"loss_coef": 0.0 if traits.kl_in_reward else 0.04},
                   optim={"carry_state": carry}, algorithm={"critic_warmup_epochs": 1 if warmup else 0})
    optimize_metrics = json.loads((tmp_path / "metrics/r1/optimize.json").read_text())
    assert json.loads((tmp_path / "models/r1/rlhf_state.json").read_text())["algorithm"] == algorithm
    if traits.objective == "trust_region":
        assert {"step_size", "kl_after_step", "backtracks", "cg_residual", "surrogate_improvement"} <= set(optimize_metrics)
    else:
        assert {"policy_loss", "entropy", "approx_kl", "optimizer_steps"} <= set(optimize_metrics)
    if traits.epochs_from_optim:  # a per-token objective on π_θ / π_old: exactly 1 on the unchanged policy
        assert optimize_metrics["first_minibatch_ratio_max_deviation"] < 1e-5
    assert ("kl_ref" in optimize_metrics) == (not traits.kl_in_reward)  # the KL loss term, from kl.loss_coef
    assert ("gate_mean" in optimize_metrics) == (traits.objective == "sapo")
    second = json.loads((tmp_path / "metrics/r2/optimize.json").read_text())
    assert optimize_metrics.get("critic_warmup_steps", 0) == (2 if warmup else 0)  # 16 responses / 8 per step
    assert "critic_warmup_steps" not in second  # r2's critic is r1's: trained already
    if carry:
        assert (tmp_path / "models/r1/optimizer/state.safetensors").is_file()
        assert optimize_metrics["optimizer_state_carried"] is False and second["optimizer_state_carried"] is True
    else:
        assert not (tmp_path / "models/r1/optimizer/state.safetensors").exists()
    assert set(json.loads((tmp_path / "metrics/eval.json").read_text())) == {"sft", "r1", "r2"}


def test_a_new_algorithm_is_one_registry_entry_and_its_pure_loss(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """The registry is the one place an algorithm is added: an entry (its traits) and, for a new objective, its pure
    per-token loss in ppo.OBJECTIVES.  Here: the leave-one-out advantages with the unclipped importance-weighted
    surrogate −ρ·A; config accepts the name, the advantages stage picks the estimator, optimize the loop and the
    loss, with nothing else edited."""
    from rlhf_core.rl.algorithms.ppo import OBJECTIVES

    def unclipped_term(out, micro, params):
        """−ρ_t A_t, ρ_t = π_θ / π_old: the surrogate of PPO without its clip."""
        ratio = torch.exp(out.logprobs - micro.old_logprobs)
        return -ratio * micro.advantages, ratio, ("ratio_above_1_2", (ratio > 1.2).float())

    monkeypatch.setitem(OBJECTIVES, "unclipped", unclipped_term)
    registry.register(registry.Algorithm(
        "loo_unclipped", "a test: leave-one-out advantages, no clip", "optim.epochs",
        registry.Traits(estimator="leave_one_out", objective="unclipped", critic="none", group_baseline=True)))
    try:
        run_two_rounds(tmp_path, tiny_checkpoint, monkeypatch, "loo_unclipped", optim={"epochs": 2})
    finally:
        del registry.ALGORITHMS["loo_unclipped"]
    metrics = json.loads((tmp_path / "metrics/r1/optimize.json").read_text())
    assert metrics["optimizer_steps"] == 4 and "ratio_above_1_2" in metrics  # optim.epochs × 2 minibatches, its stat
    assert metrics["first_minibatch_ratio_max_deviation"] < 1e-5
    advantages = pd.read_parquet(tmp_path / "advantages/r1/advantages.parquet")["advantages"]
    assert all(len(set(row)) <= 1 for row in advantages)  # one value per response: a sequence-level estimator
    assert "'estimator': 'leave_one_out'" in capsys.readouterr().err  # the advantages stage's log line
    with pytest.raises(ConfigError, match="^algorithm.name = 'loo_unclipped': must be one of"):
        load_params("params.yaml")  # unregistered again


def small_round_params(tmp_path, tiny_checkpoint, monkeypatch, **changes):
    """The repository's params on the tiny checkpoint, shrunk to seconds per stage (16 responses of 6 tokens a round,
    rounds r1 and r2), with ``changes`` ({section: {key: value}}) on top; written to tmp_path, which becomes the
    working directory."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sft"].update(model=str(tiny_checkpoint), epochs=0, num_builtin_demonstrations=40)
    raw["prepare"].update(num_builtin_prompts=60)
    raw["rollout"].update(prompts_per_round=4, samples_per_prompt=4, max_new_tokens=6)
    raw["optim"].update(epochs=1, minibatch_size=8, micro_batch_size=4)
    raw["evaluate"].update(num_prompts=4, samples_per_prompt=1, max_new_tokens=6, num_perplexity_texts=5)
    raw["rounds"] = {"r1": {"from": "sft"}, "r2": {"from": "r1"}}
    for section, values in changes.items():
        raw[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return load_params("params.yaml")


@pytest.mark.parametrize("monitor", [False, True])
def test_kl_free_rounds_never_load_the_reference(tmp_path, tiny_checkpoint, monkeypatch, monitor):
    """Both KL coefficients 0: rollout loads and runs no π_ref (r2 would load models/sft), stores no ref_logprobs, and
    advantages reports no KL; evaluate still reports the KL to sft.  kl.monitor brings the reference back."""
    import pyarrow.parquet as pq

    import rlhf_core.model.loading
    from stages import advantages, optimize, prepare, rollout, score, sft

    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, algorithm={"name": "grpo"},
                                kl={"reward_coef": 0.0, "loss_coef": 0.0, "monitor": monitor})
    assert params.uses_reference is monitor
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    loaded = []
    real_load = rlhf_core.model.loading.load_causal_lm
    monkeypatch.setattr(rlhf_core.model.loading, "load_causal_lm", lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k))
    for round_key in ("r1", "r2"):
        loaded.clear()
        for stage in (rollout, score, advantages, optimize):
            stage.main(params, argparse.Namespace(round=round_key))
    assert ("models/sft" in map(str, loaded)) is monitor  # r2 starts from r1: models/sft would be π_ref alone
    for round_key in ("r1", "r2"):
        columns = pq.read_schema(tmp_path / f"rollouts/{round_key}/rollouts.parquet").names
        assert ("ref_logprobs" in columns) is monitor
        assert ("kl_sequence_mean" in json.loads((tmp_path / f"metrics/{round_key}/advantages.json").read_text())) is monitor
        assert ("kl_k1_mean" in json.loads((tmp_path / f"metrics/{round_key}/rollout.json").read_text())) is monitor
    monkeypatch.setattr(rlhf_core.model.loading, "load_causal_lm", real_load)
    evaluate_all(params)
    assert json.loads((tmp_path / "metrics/eval.json").read_text())["r2"]["kl"] > 0.0


def test_mask_truncated_trains_only_on_responses_that_ended(tmp_path, tiny_checkpoint, monkeypatch):
    """advantages.mask_truncated: the truncated rows get trained = false and optimize steps on the others alone; when
    every response is truncated the advantages stage stops in one line."""
    from rlhf_core.errors import DataError
    from stages import advantages, optimize, prepare, rollout, score, sft

    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, advantages={"mask_truncated": True},
                                optim={"epochs": 1, "minibatch_size": 4, "micro_batch_size": 4})
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    round_key = argparse.Namespace(round="r1")
    rollout.main(params, round_key)
    path = tmp_path / "rollouts/r1/rollouts.parquet"
    table = pd.read_parquet(path)
    ended = [index < 5 for index in range(len(table))]  # the tiny model never ends within 6 tokens: say 5 did
    table.assign(ended_with_eos=ended).to_parquet(path, index=False)
    for stage in (score, advantages, optimize):
        stage.main(params, round_key)
    assert pd.read_parquet(tmp_path / "advantages/r1/advantages.parquet")["trained"].tolist() == ended
    selection = json.loads((tmp_path / "metrics/r1/advantages.json").read_text())
    assert selection["masked_truncated"] == len(table) - 5 and selection["trained_fraction"] == 5 / len(table)
    assert json.loads((tmp_path / "metrics/r1/optimize.json").read_text())["planned_steps"] == 2  # 5 rows, 4 a step

    table.assign(ended_with_eos=False).to_parquet(path, index=False)
    with pytest.raises(DataError, match="advantages.mask_truncated leaves nothing to train on"):
        advantages.main(params, round_key)


@pytest.mark.parametrize(("sampling", "mode"), [({}, "tis"), ({"top_k": 3}, "mis")])
def test_rollout_correction_through_the_stages(tmp_path, tiny_checkpoint, monkeypatch, sampling, mode):
    """rollout.record_sampler_logprobs with the hf engine: the sampler's log-probs equal the trainer's when the sampling
    is the plain softmax (tis caps nothing, every weight is 1); with top_k 3 the sampler renormalises, and mis drops
    the tokens whose π_old/μ left its band.  rollout and optimize report the mismatch and the correction."""
    from stages import advantages, optimize, prepare, rollout, score, sft

    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, rollout={"record_sampler_logprobs": True, **sampling},
                                rollout_correction={"mode": mode, **({"mis_low": 0.9} if mode == "mis" else {})})
    assert params.sampler_correction == mode
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, argparse.Namespace(round="r1"))
    rollout_metrics = json.loads((tmp_path / "metrics/r1/rollout.json").read_text())
    optimize_metrics = json.loads((tmp_path / "metrics/r1/optimize.json").read_text())
    if mode == "tis":
        assert rollout_metrics["mismatch_max_abs_logprob_diff"] < 1e-4 and rollout_metrics["mismatch_kl"] < 1e-8
        assert optimize_metrics["correction_capped_fraction"] == 0.0
        assert optimize_metrics["correction_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    else:
        assert rollout_metrics["mismatch_max_abs_logprob_diff"] > 0.1  # μ is the top-3 renormalisation of π
        assert 0.0 < optimize_metrics["correction_masked_fraction"] < 1.0
        assert optimize_metrics["correction_weight_mean"] == pytest.approx(1 - optimize_metrics["correction_masked_fraction"])


def test_dynamic_sampling_over_samples_and_trains_on_the_informative_groups(tmp_path, tiny_checkpoint, monkeypatch):
    """rollout.oversample 2 generates 8 groups for prompts_per_round 4; advantages drops the groups whose rewards are
    all equal (the tiny model's text is mostly neutral: VADER 0), keeps at most 4 of the others, and optimize steps
    on their responses alone."""
    from stages import advantages, optimize, prepare, rollout, score, sft

    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, advantages={"dynamic_sampling": True},
                                algorithm={"name": "rloo"},
                                rollout={"oversample": 2.0}, optim={"minibatch_size": 4, "micro_batch_size": 4})
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, argparse.Namespace(round="r1"))
    table = pd.read_parquet(tmp_path / "rollouts/r1/rollouts.parquet")
    assert len(table) == 8 * 4  # 2 × 4 groups of 4 samples
    totals = pd.read_parquet(tmp_path / "scores/r1/scores.parquet")["total"]
    spread = totals.groupby(table["prompt_index"]).agg(lambda v: v.max() - v.min())
    trained = pd.read_parquet(tmp_path / "advantages/r1/advantages.parquet")["trained"]
    kept = set(table["prompt_index"][trained.to_numpy()])
    metrics = json.loads((tmp_path / "metrics/r1/advantages.json").read_text())
    assert metrics["groups"] == 8 and metrics["groups_uniform"] == int((spread <= 1e-8).sum()) >= 1
    assert metrics["groups_kept"] == len(kept) == min(4, 8 - metrics["groups_uniform"]) > 0
    assert all(spread[group] > 1e-8 for group in kept)
    steps = json.loads((tmp_path / "metrics/r1/optimize.json").read_text())["planned_steps"]
    assert steps == -(-4 * len(kept) // 4)  # one epoch, 4 responses a step


def test_gdpo_advantages_come_from_the_score_components(tmp_path, tiny_checkpoint, monkeypatch):
    """grpo.normalize: components with two weighted scorers: the advantages stage reads each component column of
    scores/<round> and its weight, and every response's advantage is GDPO's (not GRPO's on the total)."""
    from rlhf_core.rl.advantages import gdpo_advantages, group_normalize
    from stages import advantages, prepare, rollout, score, sft

    scorers = [{"name": "task", "kind": "task"}, {"name": "brevity", "kind": "length", "target_length": 3, "weight": 0.5}]
    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, algorithm={"name": "grpo"},
                                kl={"reward_coef": 0.0}, grpo={"normalize": "components"}, score={"scorers": scorers})
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    for stage in (rollout, score, advantages):
        stage.main(params, argparse.Namespace(round="r1"))
    table = pd.read_parquet(tmp_path / "scores/r1/scores.parquet")
    groups = torch.tensor(pd.read_parquet(tmp_path / "rollouts/r1/rollouts.parquet")["prompt_index"].to_numpy())
    components = torch.tensor(table[["task", "brevity"]].to_numpy(), dtype=torch.float32)
    expected = gdpo_advantages(components, [1.0, 0.5], groups, scale_by_std=True, eps=params.grpo.eps)
    got = torch.tensor([a[0] for a in pd.read_parquet(tmp_path / "advantages/r1/advantages.parquet")["advantages"]])
    assert torch.allclose(got, expected, atol=1e-5)
    grpo = group_normalize(torch.tensor(table["total"].to_numpy(), dtype=torch.float32), groups, True, params.grpo.eps)
    assert (got - grpo).abs().max() > 0.1


def test_sft_fine_tunes_a_local_hf_model_on_file_demonstrations(tmp_path, tiny_checkpoint, monkeypatch):
    """sft.model = a local HF directory with sft.epochs > 0: the snapshot is a fine-tuned copy."""
    from safetensors.torch import load_file

    from rlhf_core.phases.tasks import sentiment
    from stages import sft

    pd.DataFrame(sentiment.demonstrations(60, seed=9)).to_json(tmp_path / "demos.jsonl", orient="records", lines=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sft"].update(model=str(tiny_checkpoint), epochs=1, demonstrations="file", demo_path="demos.jsonl",
                      batch_size=16, lr=1e-3, max_length=48)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    sft.main(load_params("params.yaml"), argparse.Namespace())
    metrics = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert metrics["epochs"] == 1 and metrics["steps"] == 4  # 57 training demonstrations / 16 per step
    before = load_file(str(tiny_checkpoint / "model.safetensors"))
    after = load_file(str(tmp_path / "models/sft/model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_eval_fraction_zero_trains_on_every_prompt_and_evaluate_says_what_it_reads(tmp_path, tiny_checkpoint,
                                                                                  monkeypatch, capsys):
    """prepare.eval_fraction: 0 was refused, so a run could not train on every prompt; now every prompt is a
    training prompt and evaluate, with no held-out set, reads training prompts and says so."""
    import shutil

    from stages import prepare, sft

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"].update(num_builtin_prompts=40, eval_fraction=0)
    raw["sft"].update(model=str(tiny_checkpoint), epochs=0, num_builtin_demonstrations=40)
    raw["evaluate"].update(num_prompts=4, samples_per_prompt=1, max_new_tokens=4, num_perplexity_texts=3)
    raw["rounds"] = {"r1": {"from": "sft"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    prepare.main(params, argparse.Namespace())
    sft.main(params, argparse.Namespace())
    stats = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert stats["eval_prompts"] == 0 and stats["train_prompts"] == len(pd.read_parquet("prompts/train.parquet"))
    assert list(pd.read_parquet("prompts/eval.parquet").columns) == list(pd.read_parquet("prompts/train.parquet").columns)
    shutil.copytree(tmp_path / "models/sft", tmp_path / "models/r1")
    capsys.readouterr()
    evaluate_all(params)
    err = capsys.readouterr().err
    assert "so there are no held-out prompts: evaluating on the first 4 training prompts" in err
    evaluation = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert set(evaluation) == {"sft", "r1"}
    # A model snapshot as it is (sft.epochs 0) never saw the built-in demonstrations: no perplexity on them, and a
    # line that says why (it was computed on the project's own demo reviews without a word)
    assert "perplexity skipped: sft.epochs is 0 and sft.demonstrations is builtin" in err
    assert "perplexity" not in evaluation["r1"] and "reward" in evaluation["r1"]
    assert "heldout_perplexity" not in json.loads((tmp_path / "metrics/sft.json").read_text())
