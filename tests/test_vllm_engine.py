"""rollout.engine: vllm, checked against a FAKE ``vllm`` module.

None of these tests runs vLLM: it is not installed here and there is no GPU.  The fake has the shape of
vLLM's documented offline API (``LLM(model=..., ...)``, ``SamplingParams(...)``, ``LLM.generate`` returning
``RequestOutput``s whose ``outputs`` are ``CompletionOutput``s with ``index``, ``token_ids``,
``finish_reason`` and ``stop_reason``), so the tests prove the plumbing around the engine: the params
handed to it, the (prompt, sample) order, EOS truncation, the LoRA merge, the stage branch, and the
one-line errors.  Whether the real engine samples the same distribution has not been exercised on a GPU
in this repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from rlhf_core.config import load_params, params_from_dict
from rlhf_core.errors import ConfigError, DataError

EOS = 2


class FakeCompletion:  # vllm.outputs.CompletionOutput
    def __init__(self, index, token_ids, finish_reason, stop_reason=None):
        self.index, self.token_ids = index, tuple(token_ids)
        self.finish_reason, self.stop_reason = finish_reason, stop_reason
        self.logprobs = None  # with SamplingParams(logprobs=0): per position {sampled id: Logprob}


def fake_logprob(position: int, token: int) -> float:
    return -0.1 * (position + 1) - 0.001 * token


class FakeRequestOutput:  # vllm.outputs.RequestOutput
    def __init__(self, request_id, prompt_token_ids, outputs):
        self.request_id, self.prompt_token_ids, self.outputs = request_id, prompt_token_ids, outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


def scripted(p: int, s: int, max_tokens: int, eos: int, first: int = 40) -> FakeCompletion:
    """Deterministic responses covering every way a vLLM completion can end."""
    a, b = first + p, first + 20 + s
    kind = s % 4
    if kind == 0:  # stopped on EOS, kept in token_ids (what vLLM does)
        return FakeCompletion(s, [a, b, eos], "stop", None)
    if kind == 1:  # hit max_tokens without EOS
        return FakeCompletion(s, [a + i for i in range(max_tokens)], "length", None)
    if kind == 2:  # stopped on the stop token id, which this (hypothetical) version left out of token_ids
        return FakeCompletion(s, [b], "stop", eos)
    return FakeCompletion(s, [a, eos, b, b], "stop", eos)  # tokens after an EOS are cut


def expected(p: int, s: int, max_tokens: int, eos: int, first: int = 40) -> tuple[list[int], bool]:
    a, b = first + p, first + 20 + s
    return {0: ([a, b, eos], True), 1: ([a + i for i in range(max_tokens)], False), 2: ([b, eos], True),
            3: ([a, eos], True)}[s % 4]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module in sys.modules whose LLM records what it was given."""
    from rlhf_core import vllm_engine

    record = {"llm_kwargs": [], "sampling_params": [], "prompts": [], "shutdown": 0, "on_init": None}

    class EngineCore:
        def shutdown(self):
            record["shutdown"] += 1

    class LLM:
        def __init__(self, **kwargs):
            record["llm_kwargs"].append(kwargs)
            if record["on_init"]:
                record["on_init"](kwargs)
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

        def generate(self, prompts, sampling_params, use_tqdm=True):
            record["prompts"].append(prompts)
            record["sampling_params"].append(sampling_params)
            outputs = []
            for p, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                completions = [scripted(p, s, params.max_tokens, params.stop_token_ids[0]) for s in range(params.n)]
                if getattr(params, "logprobs", None) is not None:  # every sampled token, the stop token included
                    for completion in completions:
                        sampled = list(completion.token_ids) + ([completion.stop_reason] if completion.stop_reason
                                                                and completion.stop_reason not in completion.token_ids
                                                                else [])
                        completion.logprobs = [{token: types.SimpleNamespace(logprob=fake_logprob(i, token), rank=1)}
                                               for i, token in enumerate(sampled)]
                outputs.append(FakeRequestOutput(str(p), prompt["prompt_token_ids"], completions[::-1]))  # any order
            return outputs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_engine, "_require_cuda", lambda: None)  # no GPU here
    return record


def generate(model_dir, prompt_ids, **overrides):
    from rlhf_core.vllm_engine import generate_samples_vllm

    kwargs = dict(samples_per_prompt=4, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=5, seed=100, stop_ids=[EOS],
                  dtype="float32")
    return generate_samples_vllm(model_dir, prompt_ids, **{**kwargs, **overrides})


def test_without_vllm_the_engine_is_a_one_line_config_error(monkeypatch):
    from rlhf_core.vllm_engine import generate_samples_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, even where it is installed
    with pytest.raises(ConfigError) as info:
        generate_samples_vllm("models/r1", [[5, 6]], samples_per_prompt=2, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=4, seed=0, stop_ids=[EOS])
    assert str(info.value) == ("rollout.engine = 'vllm': vLLM is not installed (pip install vllm; GPU only); "
                               "use engine: hf")


@pytest.mark.parametrize(("change", "message"), [
    ({"compute": {"num_processes": 2}}, "rollout.engine = 'vllm': needs one rollout process, got 2"),
    ({"device": "cpu"}, "rollout.engine = 'vllm': needs a CUDA GPU, not device: cpu"),
    ({"device": "mps"}, "rollout.engine = 'vllm': needs a CUDA GPU, not device: mps"),
])
def test_vllm_engine_validation(change, message):
    raw = {"rollout": {"engine": "vllm"}, **change}
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert params_from_dict({"rollout": {"engine": "vllm"}, "device": "cuda"}).rollout.engine == "vllm"
    assert params_from_dict({}).rollout.engine == "hf"
    with pytest.raises(ConfigError, match="rollout.engine = 'trt': must be one of 'hf', 'vllm'"):
        params_from_dict({"rollout": {"engine": "trt"}})


def test_samples_order_truncation_and_the_params_given_to_vllm(fake_vllm, tiny_checkpoint):
    prompt_ids = [[5, 6, 7], [8], [9, 10]]
    samples = generate(tiny_checkpoint, prompt_ids, max_new_tokens=5, seed=100)

    assert [(x.prompt_index, x.sample_index) for x in samples] == [(p, s) for p in range(3) for s in range(4)]
    for sample in samples:
        response, ended = expected(sample.prompt_index, sample.sample_index, 5, EOS)
        assert (sample.response_ids, sample.ended_with_eos) == (response, ended)
        assert sample.prompt_ids == prompt_ids[sample.prompt_index]
        assert EOS not in sample.response_ids[:-1]

    (kwargs,) = fake_vllm["llm_kwargs"]
    assert kwargs["model"] == kwargs["tokenizer"] == str(tiny_checkpoint)
    assert (kwargs["seed"], kwargs["dtype"], kwargs["enforce_eager"]) == (100, "float32", True)
    assert 0 < kwargs["gpu_memory_utilization"] < 1
    assert fake_vllm["prompts"] == [[{"prompt_token_ids": ids} for ids in prompt_ids]]
    params = fake_vllm["sampling_params"][0]
    assert len(params) == 3  # one per prompt, each with its own seed: every (prompt, sample) seeded apart
    for p, sp in enumerate(params):
        assert sp.kwargs == {"n": 4, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                             "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                             "max_tokens": 5, "seed": 100 + 4 * p, "stop_token_ids": [EOS], "ignore_eos": False,
                             "detokenize": False}
    assert fake_vllm["shutdown"] == 1  # the engine is shut down before the HF models load

    generate(tiny_checkpoint, prompt_ids[:1], top_k=7, top_p=0.9)
    assert (fake_vllm["sampling_params"][1][0].top_k, fake_vllm["sampling_params"][1][0].top_p) == (7, 0.9)


def test_a_stop_on_another_token_is_refused():
    from rlhf_core.vllm_engine import response_ids

    with pytest.raises(DataError, match=r"vLLM stopped a response on 7, not on an end id of the model \(\[2\]\)"):
        response_ids(FakeCompletion(0, [5, 7], "stop", 7), [EOS])
    assert response_ids(FakeCompletion(0, [5, 6], "length"), [EOS]) == ([5, 6], False)


def test_every_end_id_of_the_model_ends_a_vllm_response():
    """Llama 3 instruct: <|eot_id|> or <|end_of_text|> ends the turn; both go to vLLM and either is kept."""
    from rlhf_core.vllm_engine import response_ids

    assert response_ids(FakeCompletion(0, [5, 9, 6], "stop", 9), [EOS, 9]) == ([5, 9], True)
    assert response_ids(FakeCompletion(0, [5, 6], "stop", 9), [EOS, 9]) == ([5, 6, 9], True)  # stop token not kept
    assert response_ids(FakeCompletion(0, [5, 6], "stop", None), [EOS, 9]) == ([5, 6, EOS], True)


def test_a_lora_checkpoint_reaches_vllm_merged_in_a_temporary_directory(fake_vllm, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_core.config import LoraParams
    from rlhf_core.models import is_adapter_checkpoint, load_causal_lm, load_tokenizer, trainable_lora_policy

    adapters = tmp_path / "r1"
    policy = trainable_lora_policy(str(tiny_checkpoint), LoraParams(enabled=True, r=2), torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)  # B starts at 0; a trained adapter changes the logits
    policy.save_pretrained(adapters)
    load_tokenizer(str(tiny_checkpoint)).save_pretrained(adapters)
    assert is_adapter_checkpoint(adapters)
    probe = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = load_causal_lm(str(adapters), torch.device("cpu"), merge_adapters=True)(probe).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)(probe).logits
    assert not torch.allclose(want, base, atol=1e-4)
    seen = {}

    def on_init(kwargs):  # what vLLM would load: a plain model, the adapters merged in
        model_dir = Path(kwargs["model"])
        seen["dir"] = model_dir
        assert model_dir != adapters and not is_adapter_checkpoint(model_dir)
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(model_dir)(probe).logits
        seen["max_diff"] = float((got - want).abs().max())

    fake_vllm["on_init"] = on_init
    samples = generate(adapters, [[5, 6]], samples_per_prompt=2)
    assert len(samples) == 2
    assert seen["max_diff"] < 1e-5
    assert not seen["dir"].exists()  # the temporary merge is gone


def test_rollout_stage_takes_its_samples_from_vllm(fake_vllm, tiny_checkpoint, tmp_path, monkeypatch):
    """The stage's vllm branch: samples come from the engine (HF generate is never called), then log-probs,
    reference log-probs and values are recorded by the training forward pass as for engine: hf."""
    import rlhf_core.rollout
    from rlhf_core.models import load_tokenizer
    from stages import prepare, rollout, sft

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sft"].update(model=str(tiny_checkpoint), epochs=0, num_builtin_demonstrations=40)
    raw["prepare"].update(num_builtin_prompts=60)
    raw["rollout"].update(prompts_per_round=3, samples_per_prompt=4, max_new_tokens=5, engine="vllm")
    raw["rounds"] = {"r1": {"from": "sft"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    for stage in (prepare, sft):
        stage.main(params, argparse.Namespace())

    def no_hf_generate(*args, **kwargs):
        raise AssertionError("engine: vllm must not call HF generate")

    monkeypatch.setattr(rlhf_core.rollout, "generate_samples", no_hf_generate)
    eos = load_tokenizer("models/sft").eos_token_id
    rollout.main(params, argparse.Namespace(round="r1"))

    table = pd.read_parquet(tmp_path / "rollouts/r1/rollouts.parquet")
    assert len(table) == 12
    assert fake_vllm["llm_kwargs"][0]["model"] == "models/sft" and fake_vllm["llm_kwargs"][0]["dtype"] == "float32"
    for row in table.itertuples():
        response, ended = expected(row.prompt_index, row.sample_index, 5, eos)
        assert list(row.response_ids) == response and row.ended_with_eos == ended
        assert len(row.logprobs) == len(row.ref_logprobs) == len(row.values) == len(response)
    assert (table["logprobs"].map(list) == table["ref_logprobs"].map(list)).all()  # round 1: π = π_ref
    # the sampler's own log-probs ride along by default with vllm, from the distribution it sampled
    assert fake_vllm["llm_kwargs"][0]["logprobs_mode"] == "processed_logprobs"
    assert all(params.logprobs == 0 for params in fake_vllm["sampling_params"][0])
    for row in table.itertuples():
        assert list(row.sampler_logprobs) == pytest.approx([fake_logprob(i, t) for i, t in enumerate(row.response_ids)])
    metrics = json.loads((tmp_path / "metrics/r1/rollout.json").read_text())
    assert metrics["mismatch_kl"] > 0 and metrics["mismatch_max_abs_logprob_diff"] > 0


def test_without_recording_vllm_is_asked_for_no_logprobs(fake_vllm, tiny_checkpoint):
    samples = generate(str(tiny_checkpoint), [[5, 6]], record_sampler_logprobs=False)
    assert all(s.sampler_logprobs is None for s in samples)
    assert "logprobs_mode" not in fake_vllm["llm_kwargs"][0]
    assert "logprobs" not in fake_vllm["sampling_params"][0][0].kwargs
    recorded = generate(str(tiny_checkpoint), [[5, 6]], record_sampler_logprobs=True)
    assert [s.response_ids for s in recorded] == [s.response_ids for s in samples]
    assert [len(s.sampler_logprobs) for s in recorded] == [len(s.response_ids) for s in recorded]


def test_a_completion_without_the_sampled_tokens_logprobs_is_refused():
    from rlhf_core.vllm_engine import sampled_logprobs

    completion = FakeCompletion(0, [5, 6, EOS], "stop")
    completion.logprobs = [{5: types.SimpleNamespace(logprob=-1.0)}, {6: types.SimpleNamespace(logprob=-2.0)}]
    with pytest.raises(DataError, match="log-probs for 2 of the 3 tokens"):
        sampled_logprobs(completion, [5, 6, EOS])
    completion.logprobs.append({7: types.SimpleNamespace(logprob=-3.0)})
    with pytest.raises(DataError, match="lack the sampled token 2"):
        sampled_logprobs(completion, [5, 6, EOS])


def test_vllm_errors_of_newer_versions_are_one_line_config_errors(fake_vllm, tiny_checkpoint):
    """vLLM >= 0.33 raises vllm.exceptions.VLLMError subclasses (not ValueError) for values it refuses, when the
    sampling params are made or when the engine validates the request: both end in the one-line error."""

    class VLLMError(Exception):
        """vllm.exceptions.VLLMError"""

    class InvalidSamplingParams(VLLMError):
        """one of its subclasses"""

    vllm = sys.modules["vllm"]
    vllm.exceptions = types.SimpleNamespace(VLLMError=VLLMError)
    real_params = vllm.SamplingParams

    def strict_params(**kwargs):
        if kwargs["temperature"] > 2:
            raise InvalidSamplingParams(f"temperature must be in [0, 2], got {kwargs['temperature']}.\nmore detail")
        return real_params(**kwargs)

    vllm.SamplingParams = strict_params
    with pytest.raises(ConfigError) as info:
        generate(tiny_checkpoint, [[5, 6]], temperature=2.5)
    assert str(info.value) == ("rollout: vLLM refuses these sampling params (temperature must be in [0, 2], got 2.5.); "
                               "change them or use engine: hf")

    def refuse_in_engine(self, prompts, sampling_params, use_tqdm=True):
        raise InvalidSamplingParams("max_tokens exceeds the model's context")

    vllm.LLM.generate = refuse_in_engine
    with pytest.raises(ConfigError, match=r"^rollout: vLLM refuses these sampling params \(max_tokens exceeds"):
        generate(tiny_checkpoint, [[5, 6]])
    assert fake_vllm["shutdown"] == 1  # the engine that refused the request was shut down all the same


def test_gpu_memory_fraction_reaches_vllm(fake_vllm, tiny_checkpoint):
    generate(tiny_checkpoint, [[5, 6]], gpu_memory_utilization=0.35)
    assert fake_vllm["llm_kwargs"][0]["gpu_memory_utilization"] == 0.35
    assert params_from_dict({"rollout": {"gpu_memory_fraction": 0.8}}).rollout.gpu_memory_fraction == 0.8
    with pytest.raises(ConfigError, match=r"^rollout.gpu_memory_fraction = 1.5: must be < 1"):
        params_from_dict({"rollout": {"gpu_memory_fraction": 1.5}})


def test_vllm_samples_in_the_dtype_the_hf_policy_loads(tiny_checkpoint, tmp_path):
    """compute.param_dtype auto (the default): a bf16 checkpoint is sampled in bf16, a float32 one in float32 (vLLM's
    own auto would give float16), then mixed_precision decides for float32 weights."""
    from rlhf_core.models import load_causal_lm
    from rlhf_core.vllm_engine import vllm_dtype

    bf16_dir = tmp_path / "bf16"
    load_causal_lm(str(tiny_checkpoint), torch.device("cpu")).to(torch.bfloat16).save_pretrained(bf16_dir)
    compute = params_from_dict({}).compute
    assert compute.param_dtype == "auto"
    assert vllm_dtype(compute, bf16_dir) == "bfloat16" and vllm_dtype(compute, tiny_checkpoint) == "float32"
    mixed = params_from_dict({"compute": {"mixed_precision": "bf16"}}).compute
    assert vllm_dtype(mixed, tiny_checkpoint) == "bfloat16"
    assert vllm_dtype(params_from_dict({"compute": {"param_dtype": "float32"}}).compute, bf16_dir) == "float32"
