"""Every params key a stage reads is declared in that stage's `params:` in dvc.yaml, so that changing it re-runs
the stage.  The stages run in process on a tiny round, each with a proxy of the params tree that records every key
read: through the params' own properties and methods (traits, kl_coef, uses_reference, round_seed, …) too,
which run with the proxy as ``self``.  Before this test the lists were kept by hand and nothing checked them."""

from __future__ import annotations

import argparse
import types

import pytest
import yaml
from conftest import REPO
from test_stages import small_round_params

from rlhf_core.config import load_params
from rlhf_core.config.sections import Section

STRUCTURE = {"rounds"}  # the round chain: dvc.yaml's foreach and ${item.from}, not a param dependency
# Derived values that a stage reads through a file the fingerprints stage writes, instead of the keys they come from
# (so that a new kl.reward_coef re-runs no rollout): the file must be among the stage's deps.
FINGERPRINTED = {"uses_reference": "fingerprints/reference.json"}


class Recorder:
    """A read-only stand-in for a params section that adds the dotted key of every leaf read to ``reads``."""

    def __init__(self, target, prefix: str, reads: set):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name):
        target, prefix, reads = self._target, self._prefix, self._reads
        attribute = getattr(type(target), name, None)
        if name in FINGERPRINTED and not prefix:
            reads.add(FINGERPRINTED[name])
            return getattr(target, name)
        if isinstance(attribute, property):  # computed from other keys: read them through the proxy
            return attribute.fget(self)
        if name in type(target).model_fields:
            value = getattr(target, name)
            if isinstance(value, Section):
                return Recorder(value, f"{prefix}{name}.", reads)
            reads.add(f"{prefix}{name}")
            return value
        if isinstance(attribute, types.FunctionType):  # a method: its reads count too
            return types.MethodType(attribute, self)
        return getattr(target, name)

    def __iter__(self):  # dict(section), as config.replace does: every key is read
        for name, value in self._target:
            self._reads.add(f"{self._prefix}{name}")
            yield name, value

    def __setattr__(self, name, value):
        raise AttributeError("params are read-only")


def declared(stage: str) -> list[str]:
    """The stage's params: in dvc.yaml, and the fingerprint files among its deps."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    spec = spec.get("do", spec)
    return ([entry for entry in spec.get("params", []) if isinstance(entry, str)]
            + [dep for dep in spec.get("deps", []) if dep in FINGERPRINTED.values()])


def undeclared(reads: set, stage: str) -> list[str]:
    keys = declared(stage)
    return sorted(read for read in reads - STRUCTURE
                  if not any(read == key or read.startswith(key + ".") for key in keys))


@pytest.mark.parametrize("changes", [
    {},  # the default: ppo, KL in the reward
    {"algorithm": {"name": "grpo"}, "advantages": {"dynamic_sampling": True},
     "rollout": {"oversample": 1.5}},  # group-relative, KL-free, dynamic sampling
    {"algorithm": {"name": "a2c", "critic_warmup_epochs": 1}, "optim": {"carry_state": True},
     "kl": {"adaptive": True, "loss_coef": 0.01}},
], ids=["ppo", "grpo-dynamic", "a2c-warmup"])
def test_every_key_a_stage_reads_is_declared_in_dvc_yaml(tmp_path, tiny_checkpoint, monkeypatch, changes):
    from stages import advantages, evaluate, optimize, prepare, rollout, score, sft

    params = small_round_params(tmp_path, tiny_checkpoint, monkeypatch, **changes)  # rounds r1 and r2; r1 runs
    missing = {}
    runs = [("prepare", prepare, {}), ("sft", sft, {}), ("rollout", rollout, {"round": "r1"}),
            ("score", score, {"round": "r1"}), ("advantages", advantages, {"round": "r1"}),
            ("optimize", optimize, {"round": "r1"}), ("evaluate_sft", evaluate, {"checkpoint": "sft"}),
            ("evaluate", evaluate, {"checkpoint": "r1"})]
    for stage, module, args in runs:
        reads: set = set()
        module.main(Recorder(params, "", reads), argparse.Namespace(**args))
        assert reads, stage  # the proxy saw the stage's reads
        if undeclared(reads, stage):
            missing[stage] = undeclared(reads, stage)
    assert not missing, f"read but not in the stage's params: in dvc.yaml: {missing}"


def test_the_recorder_sees_reads_through_properties_and_methods():
    reads: set = set()
    proxy = Recorder(load_params(REPO / "params.yaml"), "", reads)
    assert proxy.kl_loss_coef == 0.0 and proxy.traits.clipped and isinstance(proxy.round_seed("r1", "rollout"), int)
    assert {"kl.loss_coef", "algorithm.name", "seed"} <= reads
    assert proxy.uses_reference and "fingerprints/reference.json" in reads and "kl.reward_coef" not in reads
    assert undeclared({"kl.reward_coef", "rollout.top_p", "rounds", "fingerprints/reference.json"},
                      "advantages") == ["rollout.top_p"]
    assert undeclared({"fingerprints/reference.json"}, "evaluate") == ["fingerprints/reference.json"]
