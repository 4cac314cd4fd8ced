"""End to end: every `rlhf` command against a real reduced pipeline run and its real MLflow store.

One module-scoped copy of the repo (tests/e2e/test_pipeline.py's reduced params) runs `dvc repro`
and then `dvc exp run -S ppo.clip_range=0.1`: two MLflow runs that differ in one param.  The
commands run in-process (``rlhf_core.tooling.commands.main``, cwd = the copy) and once as the installed
`rlhf` script (or ``python -m rlhf_core.tooling.commands``) in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_pipeline import _env, dvc, make_reduced_repo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = make_reduced_repo(tmp_path_factory.mktemp("commands"))
    dvc(["repro"], workdir)
    evals = {"0.2": json.loads((workdir / "metrics/eval.json").read_text())}
    dvc(["exp", "run", "-S", "ppo.clip_range=0.1"], workdir)
    evals["0.1"] = json.loads((workdir / "metrics/eval.json").read_text())
    return workdir, evals


@pytest.fixture
def rlhf(pipeline, monkeypatch, capsys):
    """Run `rlhf ARGS` in-process in the pipeline copy: (exit code, stdout, stderr)."""
    workdir, _ = pipeline
    from rlhf_core.tooling.commands import main

    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(workdir)

    def call(*args):
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def mlflow_runs(workdir: Path) -> dict[str, object]:
    """{clip_range value: MLflow run} of the copy's store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, [run.info.run_id for run in runs]
    return {run.data.params["ppo.clip_range"]: run for run in runs}


def test_rounds_rewrites_only_the_rounds_block(pipeline, rlhf):
    workdir, _ = pipeline
    from rlhf_core.config import load_params

    path = workdir / "params.yaml"
    original = path.read_bytes()
    try:
        code, out, err = rlhf("rounds", "4")
        assert code == 0, err
        assert "r4 from r3" in out
        old, new = original.decode().splitlines(), path.read_text().splitlines()
        start = old.index("rounds:")
        # Every line outside the block is byte-identical, in place; the block is r1..r4, chained.
        assert new[: start + 1] == old[: start + 1]
        assert new[start + 1:] == ["  r1: {from: sft}", "  r2: {from: r1}", "  r3: {from: r2}", "  r4: {from: r3}"]
        assert old[start + 1:] == ["  r1: {from: sft}", "  r2: {from: r1}"]
        params = load_params(path)
        assert {key: spec.start_from for key, spec in params.rounds.items()} == {
            "r1": "sft", "r2": "r1", "r3": "r2", "r4": "r3"}
        assert oct(path.stat().st_mode & 0o777) == "0o644"
        # DVC accepts it: the unrolled foreach now has the new rounds' stages, the old ones are unchanged.
        status = dvc(["status"], workdir)
        assert "rollout@r3" in status and "optimize@r4" in status
        assert "rollout@r1" not in status and "optimize@r2" not in status
        assert yaml.safe_load(path.read_text())["ppo"] == yaml.safe_load(original)["ppo"]

        code, out, _ = rlhf("rounds", "4")
        assert code == 0 and "nothing to change" in out
        code, out, err = rlhf("rounds", "0")
        assert code == 2 and out == "" and err.count("\n") == 1 and "must be >= 1" in err
        code, _, _ = rlhf("rounds", "2")
        assert code == 0 and path.read_bytes() == original  # back to 2 rounds: the original bytes
    finally:
        path.write_bytes(original)


def test_compare_shows_the_differing_param_and_each_runs_metrics(pipeline, rlhf):
    workdir, evals = pipeline
    runs = mlflow_runs(workdir)
    code, out, err = rlhf("compare")
    assert code == 0, err
    assert "params: the 1 that differ between the runs" in out
    table = out.split("\n\n", 1)[1].splitlines()
    rules = [index for index, line in enumerate(table) if line.startswith("---")]
    assert len(rules) == 2 and [line.split()[0] for line in table[rules[0] + 1:rules[1]]] == ["ppo.clip_range"]
    rows = {line.split()[0]: line.split()[1:] for index, line in enumerate(table) if index not in rules}
    columns = rows["run"]
    assert sorted(columns) == sorted(run.info.run_id[:8] for run in runs.values())
    for clip, run in runs.items():
        column = columns.index(run.info.run_id[:8])
        assert rows["ppo.clip_range"][column] == clip
        final = evals[clip]["r2"]
        assert rows["reward"][column] == f"{final['reward']:.4f}"
        assert rows["KL"][column] == f"{final['kl']:.4f}"
        assert rows["perplexity"][column] == f"{final['perplexity']:.3f}"
        assert rows["round"][column] == "r2"
        assert rows["wall"][column] != "-"
    # The wall time is that of the stages that ran: the exp run re-ran optimize@r1 onwards, not sft.
    # (Which stages, not how long: on a loaded machine the exp run's few stages can take longer than the full run.)
    full, exp = runs["0.2"].data.metrics, runs["0.1"].data.metrics
    assert "time.sft_s" in full and "time.sft_s" not in exp and "time.optimize_r1_s" in exp
    assert not any(key in exp for key in ("time.prepare_s", "time.rollout_r1_s", "time.score_r1_s"))
    assert full["time.total_s"] > 0 and exp["time.total_s"] > 0
    assert abs(full["time.total_s"] - sum(v for k, v in full.items() if k.startswith("time.") and k != "time.total_s")) < 1e-6

    # RUN by id prefix, and errors for people.
    code, out, _ = rlhf("compare", runs["0.1"].info.run_id[:6])
    assert code == 0 and "params: one run, nothing to compare" in out and f"{evals['0.1']['r2']['reward']:.4f}" in out
    code, out, err = rlhf("compare", "ffffffffff")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "unknown run 'ffffffffff'" in err and runs["0.2"].info.run_id[:8] in err


def test_samples_worst_in_ascending_total_order(pipeline, rlhf):
    workdir, _ = pipeline
    import pandas as pd

    code, out, err = rlhf("samples", "r1", "--worst", "3")
    assert code == 0, err
    scores = pd.read_parquet(workdir / "scores/r1/scores.parquet")
    components = sorted((c for c in scores.columns if c not in ("prompt_index", "sample_index", "total")),
                        key=lambda c: c == "eos_penalty")  # the scorers' columns, then the EOS penalty
    assert len(components) >= 2 and f"reward components: {', '.join(components)};" in out
    heads = [line for line in out.splitlines() if line.startswith("#")]
    assert len(heads) == 3
    totals = [float(line.split()[2]) for line in heads]
    assert totals == sorted(totals)
    assert totals == pytest.approx(sorted(scores["total"])[:3], abs=1e-4)
    assert out.count("    prompt    ") == 3 and out.count("    response  ") == 3
    component_lines = [line for line in out.splitlines() if line.startswith(f"    {components[0]} ")]
    assert len(component_lines) == 3 and all(f"{name} " in line for line in component_lines for name in components)

    code, out, _ = rlhf("samples", "r2")  # default: 5 random samples
    assert code == 0 and len([line for line in out.splitlines() if line.startswith("#")]) == 5
    code, out, err = rlhf("samples", "r7")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "round 'r7'" in err and "r1, r2" in err


def test_plot_writes_pngs_and_logs_them_to_the_runs(pipeline, rlhf):
    workdir, _ = pipeline
    import mlflow
    from matplotlib.image import imread

    code, out, err = rlhf("plot")
    assert code == 0, err
    names = ["reward_vs_round.png", "kl_vs_round.png", "reward_vs_kl.png"]
    for name in names:
        path = workdir / "plots/png" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        image = imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert (image[..., :3] < 0.5).mean() > 0.01  # lines, text and ticks, not a blank canvas
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    for run in mlflow_runs(workdir).values():
        logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(run.info.run_id, "rlhf_plot")}
        assert set(logged) == set(names) and all(size > 20_000 for size in logged.values())
    from rlhf_core.tooling.commands import _common
    from rlhf_core.tooling.commands.plot import series

    # The legend names each run by short id and the differing param; every run has sft, r1, r2.
    runs = list(mlflow_runs(workdir).values())
    store = _common.Store(client, "", mlflow_runs(workdir)["0.1"].info.experiment_id, "rlhf")
    labels = {d["label"]: d["names"] for d in series(store, runs)}
    assert {label.split()[1] for label in labels} == {"ppo.clip_range=0.1", "ppo.clip_range=0.2"}
    assert all(names == ["sft", "r1", "r2"] for names in labels.values())


def test_installed_command_and_its_errors(pipeline):
    """The console script (or `python -m rlhf_core.tooling.commands`) in a subprocess, as a person runs it."""
    workdir, evals = pipeline
    exe = shutil.which("rlhf")
    command = [exe] if exe else [sys.executable, "-m", "rlhf_core.tooling.commands"]
    env = _env()
    result = subprocess.run([*command, "compare"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ppo.clip_range" in result.stdout and f"{evals['0.1']['r2']['kl']:.4f}" in result.stdout
    result = subprocess.run([*command, "--help"], cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and all(name in result.stdout for name in ("rounds", "compare", "samples", "plot"))
    result = subprocess.run([*command, "samples", "sft"], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "no rollouts" in result.stderr
