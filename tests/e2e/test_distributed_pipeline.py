"""End to end: the reduced pipeline under `dvc repro` with compute.num_processes: 2 (gloo on CPU).

Only rollout and optimize run as 2 processes; every other stage runs once.  Before that was so, every
stage ran twice, and the two copies of prepare or score deleted each other's temporary outputs: the
pipeline failed in about half the runs.  So it runs five times in a row here (once, then `dvc repro -f`
four times), and every run must succeed and give the same outputs.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.e2e.test_pipeline import dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.e2e

TWO_PROCESSES = {
    "device": "cpu",
    "compute": {"num_processes": 2},
    "sft": {"epochs": 1, "num_builtin_demonstrations": 400},
    "rollout": {"prompts_per_round": 8, "batch_size": 8, "forward_batch_size": 8},
    "optim": {"minibatch_size": 8, "micro_batch_size": 4},
    "evaluate": {"num_prompts": 8},
    "rounds": {"r1": {"from": "sft"}},
}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_process_pipeline_runs_five_times_in_a_row(tmp_path):
    workdir = make_reduced_repo(tmp_path / "two", TWO_PROCESSES)
    runs = []
    for attempt in range(5):
        output = dvc(["repro"] if attempt == 0 else ["repro", "-f"], workdir)
        assert {"prepare", "rollout@r1", "score@r1", "optimize@r1", "eval_summary"} <= ran_stages(output), output[-3000:]
        # The launcher says how it starts each stage: accelerate for the distributed two only.
        assert output.count("accelerate.commands.launch") == 2, output[-3000:]
        leftovers = [p for p in workdir.rglob(".*.tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]
        assert not leftovers
        runs.append((digest(workdir / "rollouts/r1/rollouts.parquet"),
                     digest(workdir / "models/r1/model.safetensors"), digest(workdir / "scores/r1/scores.parquet")))
    assert len(set(runs)) == 1, runs  # the same outputs every time


@pytest.mark.parametrize("compute, weights_dtype", [
    ({"strategy": "fsdp", "param_dtype": "bfloat16"}, "bfloat16"),
    # ZeRO-3 packs one dtype: float32 weights (partitioned with their master state) and bf16 autocast
    ({"strategy": "deepspeed", "zero_stage": 3, "param_dtype": "float32", "mixed_precision": "bf16"}, "float32"),
], ids=["fsdp-bf16", "zero3-autocast-bf16"])
def test_sharded_checkpointed_two_process_pipeline_trains(tmp_path, compute, weights_dtype):
    """What a user with a bigger model sets in params.yaml (FSDP2 with bf16 weights, or DeepSpeed ZeRO-3; gradient
    checkpointing; 2 processes), through `dvc repro`: every stage runs, the checkpoints have the weights' dtype,
    and the first PPO ratio is 1."""
    import json

    import torch
    from safetensors import safe_open

    changes = {**TWO_PROCESSES, "compute": {"num_processes": 2, "gradient_checkpointing": True, **compute}}
    workdir = make_reduced_repo(tmp_path / compute["strategy"], changes)
    output = dvc(["repro"], workdir)
    assert {"prepare", "sft", "rollout@r1", "optimize@r1", "eval_summary", "track"} <= ran_stages(output)
    assert output.count("accelerate.commands.launch") == 2
    metrics = json.loads((workdir / "metrics/r1/optimize.json").read_text())
    assert metrics["optimizer_steps"] > 0 and metrics["first_minibatch_ratio_max_deviation"] < 1e-2
    assert metrics.get("zero_stage") == compute.get("zero_stage")  # DeepSpeed's engine ran optimize, or none did
    with safe_open(str(workdir / "models/r1/model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {getattr(torch, weights_dtype)}
    evaluation = json.loads((workdir / "metrics/eval.json").read_text())
    assert set(evaluation) == {"sft", "r1"}


def test_two_process_ddp_pipeline_carries_the_optimizer_state(tmp_path):
    """optim.carry_state under DDP (accelerate's wrapped optimizer): round 1 writes AdamW's state beside its
    checkpoint, round 2 starts from it, and the state's step count is both rounds' steps."""
    import json

    from rlhf_core.rl.optim import load_optimizer_state

    changes = {**TWO_PROCESSES, "optim": {**TWO_PROCESSES["optim"], "carry_state": True},
               "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}}}
    workdir = make_reduced_repo(tmp_path / "carry", changes)
    output = dvc(["repro"], workdir)
    assert {"optimize@r1", "optimize@r2"} <= ran_stages(output)
    first, second = (json.loads((workdir / f"metrics/{key}/optimize.json").read_text()) for key in ("r1", "r2"))
    assert first["optimizer_state_carried"] is False and second["optimizer_state_carried"] is True
    steps = {float(values["step"]) for values in load_optimizer_state(workdir / "models/r2").values()}
    assert steps == {float(first["optimizer_steps"] + second["optimizer_steps"])}
