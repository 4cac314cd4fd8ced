"""Log this pipeline state to MLflow: all params, per-round metrics (step = round), samples and plots."""

from pathlib import Path

from rlhf_core.io import write_json
from rlhf_core.runtime.cli import ready, run_stage


def main(params, args):
    """Log one MLflow run per reproduced pipeline state."""
    import tempfile

    import mlflow  # noqa: F401  (imported here, so that the start-up time counts it)

    from rlhf_core.runtime import stage_times
    from rlhf_core.runtime.cli import log
    from rlhf_core.tooling.tracking import log_pipeline_run, render_plots

    workdir = Path.cwd()
    ready()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = [workdir / "samples/eval.jsonl", workdir / "plots/eval_by_round.csv",
                     *render_plots(workdir / "plots/eval_by_round.csv", Path(tmp))]
        run = log_pipeline_run(params, workdir=workdir, artifacts=artifacts, log=log,
                               stage_seconds=stage_times.read(workdir),
                               stage_measures=stage_times.read_measures(workdir))
    stage_times.clear(workdir)  # logged (or the state was already logged): the next run starts from 0
    # Not in git (.gitignore): a fresh clone has no such file, so `dvc repro` logs the state to its own store.
    write_json("tracking/run.json", run)


if __name__ == "__main__":
    run_stage(main, name="track")
