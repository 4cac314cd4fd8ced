
import pytest
import torch

from rlhf_core.io import read_state
from rlhf_core.model.batches import collate
from rlhf_core.model.checkpoints import load_actor_critic, save_checkpoint
from rlhf_core.model.forward import policy_logprobs, token_logprobs
from rlhf_core.model.loading import load_causal_lm, load_tokenizer

CPU = torch.device("cpu")


def test_tokenizer_pad_is_not_eos_and_pads_left(tiny_checkpoint):
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_load_tokenizer_adds_pad_when_it_equals_eos(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token_id != reloaded.eos_token_id


def test_collate_layout():
    """Rows packed to the right: as wide as the longest sequence (5), not longest prompt + longest response (6)."""
    batch = collate([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert batch.response_start.tolist() == [3, 2]
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.response_ids.tolist() == [[1, 2, 0], [3, 4, 9]]
    # The last R+1 = 4 columns (1…4) hold the predictors: row 0's response tokens 1, 2 are predicted by
    # columns 2 and 3 (tokens 7, 1), row 1's 3, 4, 9 by columns 1, 2, 3 (tokens 8, 3, 4).
    window = batch.input_ids[:, -4:]
    assert batch.gather_response(window).tolist() == [[7, 1, 1], [8, 3, 4]]  # row 0's padding column repeats one


def test_collate_with_empty_responses_keeps_a_predictor_column():
    batch = collate([[5], [6]], [[], []], pad_id=0)
    assert batch.input_ids.shape == (2, 2) and batch.response_mask.tolist() == [[0], [0]]
    assert batch.gather_response(batch.input_ids[:, -2:]).shape == (2, 1)


def test_token_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    picked, entropy = token_logprobs(logits, torch.tensor([[1]]), temperature=1.0)
    assert picked.item() == pytest.approx(torch.log(torch.tensor(0.25)).item(), abs=1e-6)
    expected_entropy = -(0.5 * torch.log(torch.tensor(0.5)) + 0.5 * torch.log(torch.tensor(0.25))).item()
    assert entropy.item() == pytest.approx(expected_entropy, abs=1e-6)
    # temperature 2 divides the logits: softmax([log .5, log .25, log .25] / 2) ∝ [√.5, √.25, √.25]
    picked_t2, _ = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    weights = torch.tensor([0.5, 0.25, 0.25]).sqrt()
    assert picked_t2.item() == pytest.approx(torch.log(weights[0] / weights.sum()).item(), abs=1e-6)


def test_logprobs_do_not_depend_on_padding(tiny_checkpoint):
    """Left padding with position ids from the attention mask: padded and unpadded rows agree."""
    policy = load_causal_lm(str(tiny_checkpoint), CPU)
    prompt, response = [10, 11, 12], [13, 14]
    alone = policy_logprobs(policy, collate([prompt], [response], 0), 1.0)
    padded = policy_logprobs(policy, collate([prompt, [20, 21, 22, 23, 24, 25, 26]], [response, [1, 2, 3, 4, 5]], 0), 1.0)
    assert torch.allclose(alone[0], padded[0, :2], atol=1e-5)


def test_value_head_starts_at_zero_and_checkpoint_round_trips(tiny_checkpoint, tmp_path):
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    for critic in ("value_head", "separate"):
        model = load_actor_critic(str(tiny_checkpoint), critic, CPU)
        batch = collate([[10, 11]], [[12, 13, 14]], tokenizer.pad_token_id)
        out = model(batch, 1.0)
        assert out.values.abs().max().item() == 0.0
        with torch.no_grad():
            model.value_head.summary.bias.fill_(0.5)
        save_checkpoint(tmp_path / critic, model, tokenizer, {"kl_coef": 0.07})
        reloaded = load_actor_critic(str(tmp_path / critic), critic, CPU)
        assert torch.allclose(reloaded(batch, 1.0).values, torch.full((1, 3), 0.5), atol=1e-6)
        assert read_state(str(tmp_path / critic)) == {"kl_coef": 0.07}
        assert (tmp_path / critic / "critic").is_dir() == (critic == "separate")


def test_checkpoint_loads_with_plain_transformers(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_tokenizer(str(tiny_checkpoint))
    save_checkpoint(tmp_path, load_actor_critic(str(tiny_checkpoint), "value_head", CPU), tokenizer, {})
    assert (tmp_path / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == tokenizer.pad_token_id


def test_missing_model_is_a_one_line_error(tmp_path):
    from rlhf_core.errors import DataError

    with pytest.raises(DataError, match=r"^model .*nope.: no such directory \(a local path, so the Hub is not tried\)$"):
        load_causal_lm(str(tmp_path / "nope"), CPU)


def test_response_logits_with_logits_to_keep_equal_the_full_pass(tiny_checkpoint, monkeypatch):
    """The LM head on the last R+1 positions only gives the same response logits as the full pass over all W."""
    from peft import LoraConfig, get_peft_model

    import rlhf_core.model.forward as forward

    policy = load_causal_lm(str(tiny_checkpoint), CPU)
    lora_policy = get_peft_model(load_causal_lm(str(tiny_checkpoint), CPU),
                                 LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    batch = collate([[10, 11, 12], [20, 21, 22, 23, 24]], [[13, 14, 15, 16], [25]], 0)
    for model in (policy, lora_policy):
        assert forward.accepts_logits_to_keep(model)  # also through the peft wrapper
        with torch.no_grad():
            kept, _ = forward.response_logits(model, batch)
            monkeypatch.setattr(forward, "accepts_logits_to_keep", lambda _: False)
            full, _ = forward.response_logits(model, batch)
            monkeypatch.undo()
        assert kept.shape == full.shape == (2, 4, model.config.vocab_size)
        assert torch.allclose(kept, full, atol=1e-6)


def _actor_critic_loss(model, batch):
    out = model(batch, 1.0, with_values=True)
    return -(out.logprobs * batch.response_mask).sum() + (out.values * batch.response_mask).pow(2).sum()


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(tiny_checkpoint):
    """compute.gradient_checkpointing: each block's forward runs again in backward (its activations were not
    kept), in eval mode too (the pipeline never turns train mode on), and the gradients are the same."""
    from rlhf_core.model.loading import enable_gradient_checkpointing, transformer_blocks

    batch = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=0)
    plain = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    checkpointed = enable_gradient_checkpointing(load_actor_critic(str(tiny_checkpoint), "value_head", CPU))
    assert not any(block.training for block in transformer_blocks(checkpointed.policy))
    calls = []
    first_layer = next(transformer_blocks(checkpointed.policy)[0].children())  # the recompute calls its children
    first_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    _actor_critic_loss(plain, batch).backward()
    loss = _actor_critic_loss(checkpointed, batch)
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # recomputed in backward
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("param_dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                    ("auto", torch.float32)])
def test_param_dtype_loads_the_weights_in_it_and_keeps_the_value_head_and_log_probs_float32(
        tiny_checkpoint, tmp_path, monkeypatch, param_dtype, expected):
    """compute.param_dtype: float32, bfloat16, or auto (a bf16 checkpoint here, on a CPU under the AVX2 pin: float32,
    tests/test_cpu_dtype.py)."""
    for name, value in {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}.items():
        monkeypatch.setenv(name, value)
    bf16_dir = tmp_path / "bf16"
    policy = load_causal_lm(str(tiny_checkpoint), CPU).to(torch.bfloat16)
    policy.save_pretrained(bf16_dir)
    load_tokenizer(str(tiny_checkpoint)).save_pretrained(bf16_dir)
    model = load_actor_critic(str(bf16_dir), "separate", CPU, param_dtype=param_dtype)
    assert {p.dtype for p in model.policy.parameters()} == {expected}
    assert {p.dtype for p in model.critic_backbone.parameters()} == {expected}
    assert {p.dtype for p in model.value_head.parameters()} == {torch.float32}
    batch = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=0)
    out = model(batch, 0.7, with_values=True)
    assert out.logprobs.dtype == out.values.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.values).all()
    assert load_causal_lm(str(tiny_checkpoint), CPU, param_dtype="auto").dtype == torch.float32  # stored float32


@pytest.mark.parametrize("path", ["models/r9", "./nowhere", "/no/such/checkpoint", "a/b/c"])
def test_a_missing_local_path_is_one_line_and_never_tried_on_the_hub(tmp_path, monkeypatch, path):
    """A local path that does not exist used to be taken for a Hub id and retried for about 45 s before
    "couldn't connect to huggingface.co".  Now: one line, and the Hub is not contacted at all."""
    import huggingface_hub

    from rlhf_core.errors import DataError
    from rlhf_core.model.loading import safe_from_pretrained

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    for name in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # the pipeline's own checkpoint directory exists; models/r9 does not
    from transformers import AutoModelForCausalLM

    with pytest.raises(DataError, match=rf"^tokenizer '{path}': no such directory \(a local path, so the Hub is not tried\)$"):
        load_tokenizer(path)
    with pytest.raises(DataError, match=rf"^model '{path}': no such directory"):
        safe_from_pretrained(AutoModelForCausalLM, path)


def test_a_hub_like_id_is_still_a_hub_id():
    from rlhf_core.model.loading import refuse_missing_local_path

    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        refuse_missing_local_path(hub_id, "model")  # left to transformers (Hub or its cache)


def test_a_directory_that_is_not_a_model_is_one_line(tmp_path):
    """sft.model pointing at a directory with no model in it gave a 38-line traceback ending in 'You need to
    have sentencepiece or tiktoken installed'."""
    from rlhf_core.errors import DataError

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(DataError, match=rf"^tokenizer '{tmp_path}': the directory holds no tokenizer \(none of "
                                        r"tokenizer.json, .*\); is it a model directory\?$"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match=rf"^model '{tmp_path}': cannot be loaded from safetensors weights"):
        load_causal_lm(str(tmp_path), CPU)


def _offline_python(code: str, hf_home, cwd):
    """Run ``code`` where the Hub cannot be reached (HF_ENDPOINT on a closed local port) with its own cache."""
    import subprocess
    import sys

    from conftest import REPO

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HOME": str(hf_home),
           "HF_ENDPOINT": "http://127.0.0.1:9", "RLHF_PROGRESS": "off"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_id_while_offline_is_one_line_without_retries(tmp_path):
    """Before: about 45 s of 'Retrying in 8s' lines, then "couldn't connect to huggingface.co"."""
    import time

    code = ("from rlhf_core.model.loading import load_causal_lm\nimport torch\n"
            "load_causal_lm('some-org/some-model', torch.device('cpu'))")
    started = time.perf_counter()
    result = _offline_python(code, tmp_path / "hf", tmp_path)
    assert time.perf_counter() - started < 30
    assert "Retrying" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "DataError: model 'some-org/some-model': not a local directory, and the Hugging Face Hub "
        "(http://127.0.0.1:9) cannot be reached nor is it in the local cache; download it where there is a network "
        "(huggingface-cli download some-org/some-model) or give a local directory")


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path):
    """An air-gapped machine with the model pre-downloaded into the Hugging Face cache: it loads, no network."""
    import shutil

    from rlhf_core.tooling.local_models import write_local_model

    model = write_local_model(tmp_path / "model", "chatml-49k-tiny", vocab_size=1024)
    repo = tmp_path / "hf/hub/models--some-org--chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0" * 40)
    shutil.copytree(model, repo / "snapshots" / ("0" * 40))
    code = ("from rlhf_core.model.loading import load_causal_lm, load_tokenizer\nimport torch\n"
            "print(len(load_tokenizer('some-org/chat')), load_causal_lm('some-org/chat', torch.device('cpu'))"
            ".config.vocab_size)")
    result = _offline_python(code, tmp_path / "hf", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1024", "1024"] and "Retrying" not in result.stderr


def _saved_bytes(function) -> int:
    """Bytes of the tensors autograd keeps for backward while ``function`` runs (each storage once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def test_chunked_logprobs_equal_the_plain_ones_and_keep_less_for_backward():
    """A 32k vocabulary in chunks of 8 positions: the same log-probs and entropies (to the bit), the same
    gradients (to float32 rounding), and autograd keeps the bf16 logits instead of float32 [B·R, V] tensors."""
    from rlhf_core.model.forward import token_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(4, 16, 32000) * 3).to(torch.float32)
    tokens = torch.randint(0, 32000, (4, 16))
    weights = torch.randn(4, 16)
    results = {}
    for label, chunk in (("plain", 0), ("chunked", 8 * 32000)):
        leaf = logits.clone().requires_grad_(True)
        outputs = {}

        def run():
            outputs["lp"], outputs["ent"] = token_logprobs(leaf, tokens, 0.7, chunk_elements=chunk)

        saved = _saved_bytes(run)
        ((outputs["lp"] * weights).sum() + (outputs["ent"] * 0.3 * weights).sum()).backward()
        results[label] = (outputs["lp"].detach(), outputs["ent"].detach(), leaf.grad, saved)
    plain, chunked = results["plain"], results["chunked"]
    assert torch.equal(plain[0], chunked[0]) and torch.equal(plain[1], chunked[1])
    torch.testing.assert_close(chunked[2], plain[2], rtol=1e-4, atol=2e-5)  # float32 rounding of two formulas
    logits_bytes = logits.numel() * 4
    assert plain[3] >= 2 * logits_bytes  # float32 log-probs and probabilities, [B·R, V] each
    assert chunked[3] <= logits_bytes + 64 * 16 * 8  # the logits themselves, the tokens and the entropies


def test_chunked_logprobs_gradients_of_each_output_alone():
    """Either output alone (PPO without an entropy bonus uses only the log-probs), bf16 logits included."""
    from rlhf_core.model.forward import token_logprobs

    torch.manual_seed(1)
    logits = torch.randn(3, 5, 1000) * 2
    tokens = torch.randint(0, 1000, (3, 5))
    for which in (0, 1):
        grads = []
        for chunk in (0, 4 * 1000):
            leaf = logits.clone().requires_grad_(True)
            token_logprobs(leaf, tokens, 1.3, chunk_elements=chunk)[which].sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=2e-5)
    leaf = logits.to(torch.bfloat16).requires_grad_(True)
    token_logprobs(leaf, tokens, 1.0, chunk_elements=4 * 1000)[0].sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()


def test_a_critic_can_start_from_a_reward_model(tiny_checkpoint, tmp_path):
    """algorithm.critic_init: the reward model's backbone and score head become the separate critic, so V(s) at
    the last token is the reward model's score (a zero head gave V = 0 everywhere, TRL starts from the RM)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.model.checkpoints import load_actor_critic

    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    with torch.no_grad():
        reward_model.score.weight.normal_(0, 0.5)
    reward_model.save_pretrained(tmp_path / "rm")
    model = load_actor_critic(str(tiny_checkpoint), "separate", torch.device("cpu"), critic_init=str(tmp_path / "rm"))
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    with torch.no_grad():
        hidden = model.critic_backbone(input_ids=ids).last_hidden_state
        value = model.value_head(hidden)[0, -1]
        score = reward_model(input_ids=ids).logits[0, 0]
    assert value.item() == pytest.approx(score.item(), abs=1e-5) and abs(score.item()) > 1e-3
    default = load_actor_critic(str(tiny_checkpoint), "separate", torch.device("cpu"))
    assert torch.count_nonzero(default.value_head.summary.weight) == 0  # the default: V starts at 0


def test_a_critic_init_that_cannot_read_the_policys_tokens_is_refused(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.config import params_from_dict
    from rlhf_core.errors import ConfigError
    from rlhf_core.model.checkpoints import load_actor_critic

    config = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1).config
    config.vocab_size += 8
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "other_vocab")
    with pytest.raises(ConfigError, match="has a vocabulary of .* tokens, the policy .*: a critic must read the policy"):
        load_actor_critic(str(tiny_checkpoint), "separate", torch.device("cpu"), critic_init=str(tmp_path / "other_vocab"))
    config.vocab_size -= 8
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "wider")
    with pytest.raises(ConfigError, match="has hidden size .*, the policy .*: the value head must fit both"):
        load_actor_critic(str(tiny_checkpoint), "separate", torch.device("cpu"), critic_init=str(tmp_path / "wider"))
    with pytest.raises(ConfigError, match=r"^algorithm.critic_init = 'reward_models/rm': algorithm.name = 'grpo' trains no critic"):
        params_from_dict({"algorithm": {"name": "grpo", "critic": "separate", "critic_init": "reward_models/rm"},
                          "kl": {"reward_coef": 0}})
    assert params_from_dict({"algorithm": {"critic_init": "./models/sft/"}}).algorithm.critic_init == "./models/sft/"
    with pytest.raises(ConfigError, match=r"^algorithm.critic_init = 'reward_models/rm': needs algorithm.critic = 'separate'"):
        params_from_dict({"algorithm": {"critic_init": "reward_models/rm"}})
    with pytest.raises(ConfigError, match=r"reward_models.rm.base is 'builtin'; a critic reads the policy's tokens"):
        params_from_dict({"algorithm": {"critic": "separate", "critic_init": "reward_models/rm"},
                          "reward_models": {"rm": {"base": "builtin"}}})
