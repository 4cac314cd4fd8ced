"""The one writer of MLflow runs.

One reproduced pipeline state = one MLflow run.  The state is identified by a hash of all params,
the git revision and the bytes of the pipeline's metrics; a run with the same ``pipeline_state`` tag
is never logged twice, so re-running the track stage (``dvc repro -f``, a run-cache restore) does
not create duplicates, while any change of params, code or results does create a new run.

The default tracking URI is a SQLite file at the repository root, also when DVC runs the stage in a
temporary copy (``dvc exp run --temp`` / ``--queue``).  MLFLOW_TRACKING_URI overrides it, and so
does ``tracking.tracking_uri`` in params.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from rlhf_core.config import flatten
from rlhf_core.io import repo_root

# Per-round training diagnostics logged with step = round number.
ROUND_METRIC_FILES = ("rollout", "score", "advantages", "optimize")


def tracking_uri(params, root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI, else tracking.tracking_uri, else sqlite:///<repo root>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.tracking.tracking_uri:
        return params.tracking.tracking_uri
    root = root or repo_root()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str:
    return (root / "mlartifacts").resolve().as_uri()


def git_revision(cwd: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def collect_history(params, metrics_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}}: eval metrics of every checkpoint (sft = step 0), each round's diagnostics,
    and each trained reward model's metrics (step 0, as reward_model/<name>/<metric>)."""
    history: dict[int, dict[str, float]] = {}
    evaluation = json.loads((metrics_dir / "eval.json").read_text())
    for name, values in evaluation.items():
        step = params.round_index(name)
        history.setdefault(step, {}).update({f"eval/{k}": float(v) for k, v in values.items()})
    for path in sorted((metrics_dir / "reward_models").glob("*.json")):
        values = json.loads(path.read_text())
        history.setdefault(0, {}).update({f"reward_model/{path.stem}/{k}": float(v) for k, v in values.items()
                                          if isinstance(v, (int, float))})
    for round_key in params.rounds:
        step = params.round_index(round_key)
        for stage in ROUND_METRIC_FILES:
            path = metrics_dir / round_key / f"{stage}.json"
            if path.is_file():
                values = json.loads(path.read_text())
                history.setdefault(step, {}).update(
                    {f"{stage}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
    return history


def pipeline_state(params, git_rev: str, metrics_dir: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(params.to_dict(), sort_keys=True).encode())
    digest.update(git_rev.encode())
    for path in sorted(metrics_dir.rglob("*.json")):
        digest.update(str(path.relative_to(metrics_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def log_pipeline_run(params, *, workdir: Path, artifacts: list[Path], log=print,
                     stage_seconds: dict[str, float] | None = None,
                     stage_measures: dict[str, dict[str, float]] | None = None) -> dict:
    """Log one MLflow run for the pipeline state in ``workdir`` (unless that state is already logged).

    ``stage_seconds`` ({stage: wall seconds} of the stages that ran for this state, see stage_times)
    are logged as ``time.total_s`` and ``time.<stage>_s`` at step 0, and ``stage_measures`` ({stage: {measure:
    value}}: tokens/s, peak memory) as ``perf.<stage>.<measure>``.

    Returns {run_id, experiment_id, tracking_uri, pipeline_state, created}.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    root = repo_root(workdir)
    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        experiment_id = client.create_experiment(params.tracking.experiment, artifact_location=artifact_root(root))
    else:
        experiment_id = experiment.experiment_id

    metrics_dir = workdir / "metrics"
    git_rev = git_revision(workdir)
    state = pipeline_state(params, git_rev, metrics_dir)
    existing = client.search_runs([experiment_id], filter_string=f"tags.pipeline_state = '{state}'", max_results=1)
    summary = {"experiment_id": experiment_id, "tracking_uri": uri, "pipeline_state": state}
    if existing:
        log(f"track: pipeline state {state} already logged as run {existing[0].info.run_id}; nothing to do")
        return {**summary, "run_id": existing[0].info.run_id, "created": False}

    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"pipeline_state": state, "params_hash": params.hash(), "git_commit": git_rev,
            "dvc_exp_name": exp_name or "workspace", "mlflow.runName": exp_name or f"repro-{state[:8]}"}
    run = client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
    run_id = run.info.run_id
    try:
        values = flatten(params.to_dict())
        # an `auto` coefficient as the algorithm resolved it, e.g. kl.reward_coef "auto (0.05)": compare shows it
        values.update({f"kl.{key}": f"auto ({value:g})" for key, value in params.auto_resolved.items()})
        flat_params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(values.items())]
        history = collect_history(params, metrics_dir)
        timestamp = int(run.info.start_time)
        metrics = [Metric(key.replace("/", "."), value, timestamp, step)
                   for step, values in sorted(history.items()) for key, value in sorted(values.items())]
        if stage_seconds:
            from rlhf_core.runtime.stage_times import metric_name

            metrics += [Metric("time.total_s", float(sum(stage_seconds.values())), timestamp, 0)]
            metrics += [Metric(metric_name(stage), float(s), timestamp, 0) for stage, s in sorted(stage_seconds.items())]
        if stage_measures:
            from rlhf_core.runtime.stage_times import metric_name

            metrics += [Metric(metric_name(stage, measure), float(value), timestamp, 0)
                        for stage, values in sorted(stage_measures.items()) for measure, value in sorted(values.items())]
        for start in range(0, len(flat_params), 100):
            client.log_batch(run_id, params=flat_params[start:start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        client.log_batch(run_id, tags=[RunTag("rounds", ",".join(params.rounds))])
        for artifact in artifacts:
            if artifact.is_file():
                client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    log(f"track: logged run {run_id} ({tags['mlflow.runName']}) to {uri}")
    return {**summary, "run_id": run_id, "created": True}


def render_plots(csv_path: Path, out_dir: Path) -> list[Path]:
    """PNG plots of reward vs round, KL vs round and reward vs KL from the evaluate table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.read_csv(csv_path)
    specs = [("reward_vs_round.png", "step", "reward", "round (0 = SFT)", "eval reward", "Eval reward by round"),
             ("kl_vs_round.png", "step", "kl", "round (0 = SFT)", "KL(π‖π_ref), nats", "KL to the reference by round"),
             ("reward_vs_kl.png", "kl", "reward", "KL(π‖π_ref), nats", "eval reward", "Reward against KL to the reference")]
    paths = []
    for name, x, y, xlabel, ylabel, title in specs:
        figure, axes = plt.subplots(figsize=(5, 3.5), dpi=100)
        axes.plot(table[x], table[y], marker="o")
        for _, row in table.iterrows():
            axes.annotate(str(row["round"]), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title, fontsize=10)
        axes.margins(x=0.08, y=0.12)  # room for the point labels at the edges
        if x == "step":
            axes.set_xticks(table["step"].tolist())
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths
