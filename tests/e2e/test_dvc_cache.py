"""End to end: the pipeline under a link-based DVC cache (docs/performance.md#dvc-at-real-checkpoint-sizes).

With `cache.type: hardlink,symlink` the workspace's outputs are links into `.dvc/cache`, so a stage that wrote
into an existing output in place would change the cached copy under every version that shares it.  No stage
does: DVC removes a stage's outputs before it runs, and every output is written into a temporary sibling and
renamed into place (rlhf_core.io.atomic_dir / atomic_file).  So after a repro and an experiment that re-runs
stages, every cache file must still hash to its own name.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.e2e.test_pipeline import REDUCED, dvc, make_reduced_repo, ran_stages

pytestmark = pytest.mark.e2e


def test_a_link_cache_is_never_written_through(tmp_path):
    workdir = make_reduced_repo(tmp_path / "links", reduced={**REDUCED, "rounds": {"r1": {"from": "sft"}}})
    dvc(["config", "cache.type", "hardlink,symlink"], workdir)
    dvc(["repro"], workdir)
    checkpoint = workdir / "models/r1/model.safetensors"
    assert checkpoint.stat().st_nlink == 2 or checkpoint.is_symlink()  # a link into the cache, not a copy
    output = dvc(["exp", "run", "-S", "ppo.clip_range=0.1"], workdir)
    assert "optimize@r1" in ran_stages(output)
    cache = workdir / ".dvc/cache/files/md5"
    files = [path for path in cache.rglob("*") if path.is_file() and not path.name.endswith(".dir")]
    assert len(files) > 10
    for path in files:
        assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name, path
    # every output matches dvc.lock (the fingerprints stage is always-changed by design)
    assert dvc(["status"], workdir).split() == ["fingerprints:", "always", "changed"]
