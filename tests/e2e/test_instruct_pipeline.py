"""End to end: `dvc repro` on a locally built model with a real instruct model's shape and quirks
(``rlhf_core.tooling.local_models``: SmolLM2's 49,152-token vocabulary, a ChatML template with a system turn,
pad == eos, two end ids in the generation config), fine-tuned on the chat-templated demonstrations,
then 2 rounds of PPO.  The final checkpoint loads with `transformers.pipeline` from another directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.test_pipeline import dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.e2e


def test_instruct_model_pipeline(tmp_path):
    from rlhf_core.tooling.local_models import write_local_model

    model_dir = write_local_model(tmp_path / "smollm2-like", "chatml-49k-tiny")
    workdir = make_reduced_repo(tmp_path / "repo", {
        "device": "cpu",
        "chat": {"system_prompt": "You write restaurant reviews."},
        "sft": {"model": str(model_dir), "epochs": 1, "num_builtin_demonstrations": 200, "lr": 3e-3,
                "batch_size": 16, "micro_batch_size": 8},
        "rollout": {"prompts_per_round": 8, "samples_per_prompt": 2, "max_new_tokens": 8},
        "optim": {"minibatch_size": 8, "micro_batch_size": 4},
        "evaluate": {"num_prompts": 4, "max_new_tokens": 8, "num_perplexity_texts": 8},
    })
    output = dvc(["repro"], workdir)
    assert {"prepare", "sft", "rollout@r1", "optimize@r1", "rollout@r2", "optimize@r2", "eval_summary"} <= ran_stages(output)

    snapshot = json.loads((workdir / "models/sft/generation_config.json").read_text())
    config = json.loads((workdir / "models/r2/config.json").read_text())
    assert config["vocab_size"] == 49152  # pad is a spare special token: the embeddings keep their shape
    assert len(snapshot["eos_token_id"]) == 2 and config["pad_token_id"] not in snapshot["eos_token_id"]
    evaluation = json.loads((workdir / "metrics/eval.json").read_text())
    assert set(evaluation) == {"sft", "r1", "r2"}

    # A user's script elsewhere: plain transformers, the chat template travels with the checkpoint.
    script = ("import sys; from transformers import pipeline\n"
              "chat = pipeline('text-generation', model=sys.argv[1], device='cpu')\n"
              "out = chat([{'role': 'user', 'content': 'The food was'}], max_new_tokens=4, do_sample=False)\n"
              "print(out[0]['generated_text'][-1]['role'])\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(workdir / "models/r2")], cwd=elsewhere,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("assistant"), result.stderr[-2000:]
