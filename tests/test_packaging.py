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
