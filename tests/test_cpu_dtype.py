"""compute.param_dtype on a CPU: `auto` never walks into bf16 weights that the CPU runs 10–50× slower than float32,
and an explicit bfloat16 that will be slow says so in one line before the weights load."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_core.model.loading import cpu_param_dtype, load_causal_lm, slow_cpu_bf16

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
NATIVE_BF16 = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


def test_bf16_is_slow_under_the_avx2_pin_or_without_bf16_instructions():
    assert slow_cpu_bf16(PINNED, NATIVE_BF16) == ("cpu_isa: avx2 pins the CPU kernels to AVX2, which has no bf16 "
                                                  "instructions")
    assert slow_cpu_bf16({}, {"avx2", "avx512f"}) == "this CPU has no bf16 instructions (AVX512-BF16, AMX or ARM bf16)"
    assert slow_cpu_bf16({}, NATIVE_BF16) is None
    assert slow_cpu_bf16({}, {"fp", "asimd", "bf16"}) is None  # an ARMv8.6 CPU


def _stored(tmp_path, dtype: str):
    directory = tmp_path / dtype
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": dtype}))
    return directory


@pytest.mark.parametrize(("setting", "stored", "environ", "flags", "resolved", "said"), [
    ("auto", "bfloat16", PINNED, NATIVE_BF16, "float32", "compute.param_dtype = auto: {path} is stored in bfloat16, "
     "loaded in float32 on this CPU (cpu_isa: avx2 pins the CPU kernels to AVX2, which has no bf16 instructions; "
     "16-bit weights would take 10–50× the time of float32 (docs/performance.md#bfloat16-on-a-cpu))"),
    ("auto", "bfloat16", {}, {"avx2"}, "float32", "compute.param_dtype = auto: {path} is stored in bfloat16, loaded "
     "in float32 on this CPU (this CPU has no bf16 instructions"),
    ("auto", "bfloat16", {}, NATIVE_BF16, "auto", None),  # cpu_isa: native on a CPU with bf16: the checkpoint's
    ("auto", "float16", {}, NATIVE_BF16, "float32", "compute.param_dtype = auto: {path} is stored in float16, loaded "
     "in float32 on this CPU (float16 matmuls are slow on CPUs"),
    ("auto", "float32", PINNED, NATIVE_BF16, "auto", None),  # the default pipeline: nothing changes
    ("float32", "bfloat16", PINNED, NATIVE_BF16, "float32", None),
    ("bfloat16", "float32", PINNED, NATIVE_BF16, "bfloat16", "compute.param_dtype = 'bfloat16' on a CPU: cpu_isa: "
     "avx2 pins the CPU kernels to AVX2, which has no bf16 instructions, so expect 10–50× the time of float32 "
     "(docs/performance.md#bfloat16-on-a-cpu); set param_dtype: auto or float32, or cpu_isa: native on a CPU with "
     "AVX512-BF16/AMX"),
    ("bfloat16", "bfloat16", {}, NATIVE_BF16, "bfloat16", None),
])
def test_what_auto_means_on_a_cpu(tmp_path, setting, stored, environ, flags, resolved, said):
    path = _stored(tmp_path, stored)
    lines = []
    assert cpu_param_dtype(setting, path, environ=environ, flags=flags, say=lines.append) == resolved
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(said.format(path=path))


def test_a_bf16_checkpoint_loads_in_float32_on_a_pinned_cpu_and_an_explicit_bf16_says_its_cost(tmp_path, monkeypatch,
                                                                                           capsys):
    from rlhf_core.tooling.local_models import write_local_model

    directory = write_local_model(tmp_path / "model", "chatml-49k-tiny", vocab_size=1024)
    model = load_causal_lm(str(directory), torch.device("cpu"))
    model.to(torch.bfloat16).save_pretrained(directory)  # as most Hub checkpoints are stored
    for name, value in PINNED.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    loaded = load_causal_lm(str(directory), torch.device("cpu"), param_dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert capsys.readouterr().err.count("loaded in float32 on this CPU") == 1
    explicit = load_causal_lm(str(directory), torch.device("cpu"), param_dtype="bfloat16")
    assert {p.dtype for p in explicit.parameters()} == {torch.bfloat16}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "expect 10–50× the time of float32" in lines[0]
    meta = load_causal_lm(str(directory), torch.device("meta"), param_dtype="auto")  # an FSDP rank other than 0
    assert {p.dtype for p in meta.parameters()} == {torch.float32}
