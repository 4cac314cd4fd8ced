"""SIGKILL at seeded random moments: `dvc repro` then completes, and the outputs equal those of an
uninterrupted run, byte for byte.

Every stage gets a seeded random kill moment early in its run (0.1–1 s after it starts: interpreter
start-up and imports), and the stages with real work (sft, rollout, optimize, evaluate) a second,
later one (1–6 s: loading, generating, training, writing).  When a stage is still running at its
moment, the stage's processes (every descendant of `dvc repro`) get SIGKILL; DVC reports the failed
stage and exits, and `dvc repro` is started again.  At least 10 kills land.

DVC itself is not killed: SIGKILL of DVC while it rewrites dvc.lock can leave a truncated dvc.lock
("dvc.lock validation failed"), which is DVC's own file and outside what a stage can protect.  When a run finally completes, `dvc repro -f` re-runs everything
uninterrupted, and the md5 of every output in dvc.lock must be unchanged.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import subprocess
import time

import pytest
import yaml

from .test_pipeline import ALL_STAGES, _env, dvc, make_reduced_repo, output_md5s

pytestmark = pytest.mark.e2e
MIN_KILLS = 10


def repro_with_kills(workdir, kill_after: dict[str, list[float]], log_path) -> tuple[list[str], bool]:
    """One `dvc repro`; SIGKILL its process group when a pending stage has run for its kill delay.

    Returns (stages killed in this attempt, whether the repro completed).
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(["dvc", "repro"], cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    import psutil

    current, started = None, 0.0
    while process.poll() is None:
        running = re.findall(r"Running stage '([^']+)'", log_path.read_text())
        if running and running[-1] != current:
            current, started = running[-1], time.monotonic()
        if kill_after.get(current) and time.monotonic() - started >= kill_after[current][0]:
            try:
                stage_processes = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                stage_processes = []
            killed_any = False
            for child in stage_processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if child.status() != psutil.STATUS_ZOMBIE:  # a stage that has ended but is not yet reaped
                        child.send_signal(signal.SIGKILL)
                        killed_any = True
            if killed_any:  # the stage was still running (not DVC's own bookkeeping after it, nor just gone)
                process.wait()
                kill_after[current].pop(0)
                assert process.returncode != 0  # DVC saw the stage die and stopped
                return [current], False
        time.sleep(0.02)
    assert process.returncode == 0, log_path.read_text()[-4000:]
    return [], True


def test_sigkill_at_random_moments_then_repro_matches_an_uninterrupted_run(tmp_path):
    workdir = make_reduced_repo(tmp_path / "repo")
    rng = random.Random(20261121)
    # A stage's process lives 0.3-1 s for most stages (launcher, warm fork, work): the first kill comes early
    # enough to land in it; long stages get a second one later
    kill_after = {stage: [rng.uniform(0.05, 0.6)] for stage in sorted(ALL_STAGES)}
    for stage in sorted(ALL_STAGES):
        if stage.split("@")[0] in ("sft", "rollout", "optimize", "evaluate", "evaluate_sft"):
            kill_after[stage].append(rng.uniform(1.0, 6.0))
    killed: list[str] = []
    for _ in range(sum(len(moments) for moments in kill_after.values()) + 1):
        newly_killed, completed = repro_with_kills(workdir, kill_after, tmp_path / "repro.log")
        killed += newly_killed
        if completed:
            break
    assert completed
    assert len(killed) >= MIN_KILLS, killed
    kinds = {name.split("@")[0].removesuffix("_sft") for name in killed}  # evaluate@r1 and evaluate_sft: evaluate
    assert kinds >= {"sft", "rollout", "advantages", "optimize", "evaluate"}, killed
    leftovers = [p for p in workdir.rglob(".*.tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert not leftovers, leftovers  # a re-run stage clears the temporary siblings its killed run left

    resumed = output_md5s(yaml.safe_load((workdir / "dvc.lock").read_text()))
    dvc(["repro", "-f"], workdir)
    uninterrupted = output_md5s(yaml.safe_load((workdir / "dvc.lock").read_text()))
    assert resumed == uninterrupted, killed
