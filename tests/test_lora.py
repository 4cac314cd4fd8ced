"""LoRA through peft: the reduced pipeline end to end with lora.enabled, adapter checkpoints that point at
models/sft, the reference as the base with the adapters disabled, and a merged export for serving."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, evaluate_all

from rlhf_core.config import load_params, params_from_dict
from rlhf_core.errors import ConfigError


def test_lora_pipeline_runs_end_to_end_and_exports_a_merged_model(tmp_path, tiny_checkpoint, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_core.model.batches import collate
    from rlhf_core.model.export import export_merged
    from rlhf_core.model.forward import policy_logprobs
    from rlhf_core.model.loading import load_causal_lm
    from stages import advantages, optimize, prepare, rollout, score, sft

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sft"].update(model=str(tiny_checkpoint), epochs=0, num_builtin_demonstrations=40)
    raw["prepare"].update(num_builtin_prompts=60)
    raw["rollout"].update(prompts_per_round=8, samples_per_prompt=2, max_new_tokens=8)
    raw["optim"].update(epochs=2, minibatch_size=8, micro_batch_size=4, lr=1e-2)
    raw["ppo"]["target_kl"] = None
    raw["evaluate"].update(num_prompts=4, samples_per_prompt=1, max_new_tokens=6, num_perplexity_texts=5)
    raw["lora"].update(enabled=True, r=4, alpha=8.0, lr_scale=1.0)  # optim.lr 1e-2 is already large here
    raw["rounds"] = {"r1": {"from": "sft"}, "r2": {"from": "r1"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())
    sft_weights = (tmp_path / "models/sft/model.safetensors").read_bytes()
    for round_key in ("r1", "r2"):
        for stage in (rollout, score, advantages, optimize):
            stage.main(params, argparse.Namespace(round=round_key))
    evaluate_all(params)

    # The checkpoints hold adapters + value head, point at models/sft, and are a fraction of the full model.
    for round_key in ("r1", "r2"):
        ckpt = tmp_path / "models" / round_key
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "value_head.safetensors").is_file()
        assert not (ckpt / "model.safetensors").exists()
        base = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str((tmp_path / "models/sft").resolve())  # absolute: loads from any directory
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        assert size < 0.25 * len(sft_weights), (size, len(sft_weights))
        metrics = json.loads((tmp_path / f"metrics/{round_key}/optimize.json").read_text())
        # rollout and training agree through the adapters: the first ratio is 1
        assert metrics["first_minibatch_ratio_max_deviation"] < 1e-5
    assert (tmp_path / "models/sft/model.safetensors").read_bytes() == sft_weights  # the base never trains
    adapters = load_file(str(tmp_path / "models/r2/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapters.items())  # B starts at 0: it trained
    assert set(json.loads((tmp_path / "metrics/eval.json").read_text())) == {"sft", "r1", "r2"}

    # r2's reference log-probs (the base with the adapters disabled) are those of models/sft itself.
    table = pd.read_parquet(tmp_path / "rollouts/r2/rollouts.parquet").head(6)
    batch = collate([list(p) for p in table["prompt_ids"]], [list(r) for r in table["response_ids"]], pad_id=0)
    reference = load_causal_lm("models/sft", torch.device("cpu"))
    with torch.inference_mode():
        ref = policy_logprobs(reference, batch, params.rollout.temperature)
    for row, recorded in enumerate(table["ref_logprobs"]):
        assert torch.allclose(ref[row, :len(recorded)], torch.tensor(recorded), atol=1e-5)
    assert any(not torch.allclose(torch.tensor(a), torch.tensor(b)) for a, b in zip(table["logprobs"], table["ref_logprobs"]))

    # Plain peft loads the adapters from another working directory (the base was the relative models/sft).
    from peft import AutoPeftModelForCausalLM

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "models/r2"))
    monkeypatch.chdir(tmp_path)

    # The merged export is one plain model with the adapter model's logits.
    out = export_merged("models/r2", tmp_path / "exported")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = load_causal_lm("models/r2", torch.device("cpu"))
    with torch.inference_mode():
        a = adapted(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids).logits
        m = merged.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).logits
        base = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits
    assert torch.allclose(a, m, atol=1e-4), (a - m).abs().max()
    assert not torch.allclose(a, base, atol=1e-4)  # the adapters do change the model

    # LoRA turned off in a later round: that round starts from the merged model and trains it whole.
    raw["lora"]["enabled"] = False
    raw["rounds"]["r3"] = {"from": "r2"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, argparse.Namespace(round="r3"))
    assert (tmp_path / "models/r3/model.safetensors").is_file()
    assert not (tmp_path / "models/r3/adapter_config.json").exists()
    assert json.loads((tmp_path / "metrics/r3/optimize.json").read_text())["first_minibatch_ratio_max_deviation"] < 1e-5


def test_lora_params_are_checked():
    with pytest.raises(ConfigError, match=r"^lora.enabled: the LoRA policy needs algorithm.critic = 'value_head'"):
        params_from_dict({"lora": {"enabled": True}, "algorithm": {"critic": "separate"}})
    with pytest.raises(ConfigError, match=r"^lora.r = 0: must be >= 1$"):
        params_from_dict({"lora": {"r": 0}})


def test_a_moved_repository_finds_its_base_next_to_the_checkpoint(tmp_path):
    """The absolute base of a repository cloned or moved elsewhere no longer exists: models/sft beside the
    checkpoint is used instead."""
    from rlhf_core.model.loading import adapter_base

    (tmp_path / "models/sft").mkdir(parents=True)
    (tmp_path / "models/r1").mkdir()
    (tmp_path / "models/r1/adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/gone/repo/models/sft"}))
    assert adapter_base(tmp_path / "models/r1") == str(tmp_path / "models/sft")


def test_adapters_learn_at_their_own_rate(tiny_checkpoint):
    """lora.lr_scale: the adapters' AdamW group runs at optim.lr × lr_scale, the value head's at optim.lr."""
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.rl.algorithms.common import lora_parameter_ids, make_optimizer

    params = params_from_dict({"lora": {"enabled": True, "lr_scale": 20.0}, "optim": {"lr": 1e-4}})
    model = load_actor_critic(str(tiny_checkpoint), "value_head", torch.device("cpu"), lora=params.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, 1e-4, 1e-5, 0.0, "constant", 0, 10,
                                          scaled=lora_parameter_ids(model), lr_scale=params.lora.lr_scale)
    base, adapters = optimizer.param_groups
    assert base["lr"] == pytest.approx(1e-4) and adapters["lr"] == pytest.approx(2e-3)
    assert {id(p) for p in base["params"]} == {id(p) for p in model.value_head.parameters()}
    assert len(adapters["params"]) > 0 and all(id(p) in lora_parameter_ids(model) for p in adapters["params"])
    assert scheduler.get_last_lr() == pytest.approx([1e-4, 2e-3])
