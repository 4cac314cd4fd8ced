"""What the commands share: the repository root, params.yaml, the MLflow store and choosing runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from rlhf_core.errors import ConfigError, DataError, first_line

DEFAULT_SAMPLES = 5  # rlhf samples: how many it shows without --worst/--best/--random


def root() -> Path:
    from rlhf_core.io import repo_root

    return repo_root()


def params_path(args) -> Path:
    return Path(args.params) if args.params else root() / "params.yaml"


def load(args):
    """Validated params; a missing file says where it was looked for."""
    from rlhf_core.config import load_params

    path = params_path(args)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run rlhf from the repository (the folder with dvc.yaml "
                          "and params.yaml) or pass --params PATH")
    return load_params(path)


# ---------------------------------------------------------------------------------------------------
# MLflow


@dataclass
class Store:
    client: object
    uri: str
    experiment_id: str
    experiment: str


def _local_store_path(uri: str) -> Path | None:
    """The file or folder behind a local tracking URI (sqlite:///, file:, a plain path); None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):].split("?")[0]) or ".")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or re.match(r"^[A-Za-z]:[\\/]", uri):
        return Path(uri)
    return None


def open_store(params, repo: Path | None = None) -> Store:
    """The MLflow client of the params' tracking URI and experiment; one-line errors when either is missing."""
    from rlhf_core.tooling.tracking import tracking_uri

    uri = tracking_uri(params, repo or root())
    local = _local_store_path(uri)
    if local is not None and not local.exists():  # opening a missing sqlite file would create an empty store
        raise DataError(f"no MLflow store at {uri}: run the pipeline first (`dvc repro`; its track stage logs the "
                        "runs), or set tracking.tracking_uri / MLFLOW_TRACKING_URI")
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        names = [e.name for e in client.search_experiments()] if experiment is None else []
    except MlflowException as exc:
        raise DataError(f"{uri}: cannot read the MLflow store ({first_line(exc)[:200]})") from None
    if experiment is None:
        raise DataError(f"no MLflow experiment {params.tracking.experiment!r} (tracking.experiment) in {uri}; "
                        f"experiments there: {', '.join(names) or 'none'}")
    return Store(client, uri, experiment.experiment_id, experiment.name)


def short(run) -> str:
    return run.info.run_id[:8]


def _all_runs(store: Store) -> list:
    return list(store.client.search_runs([store.experiment_id], max_results=10_000,
                                         order_by=["attributes.start_time DESC"]))


def select_runs(store: Store, refs: list[str], latest: int) -> list:
    """Runs named by id, id prefix or run name, in the given order; without refs the ``latest`` newest runs."""
    if latest < 1:
        raise ConfigError(f"--latest {latest}: must be >= 1")
    runs = _all_runs(store)
    if not refs:
        if not runs:
            raise DataError(f"no runs in MLflow experiment {store.experiment!r} at {store.uri}: "
                            "run the pipeline first (`dvc repro` or `dvc exp run`)")
        return runs[:latest]
    chosen = []
    for ref in refs:
        matches = [run for run in runs if run.info.run_id.startswith(ref.lower())] if re.fullmatch(r"[0-9a-fA-F]+", ref) else []
        if not matches:
            matches = [run for run in runs if run.info.run_name == ref]
        if len(matches) > 1:
            listed = ", ".join(f"{short(run)} ({run.info.run_name})" for run in matches[:6])
            raise DataError(f"run {ref!r} is ambiguous: it matches {len(matches)} runs ({listed}); give more of the id")
        if not matches:
            known = ", ".join(f"{short(run)} ({run.info.run_name})" for run in runs[:5]) or "none"
            raise DataError(f"unknown run {ref!r}: no run id, id prefix or run name in experiment {store.experiment!r} "
                            f"at {store.uri} matches it; latest runs: {known}")
        if matches[0].info.run_id not in {run.info.run_id for run in chosen}:
            chosen.append(matches[0])
    return chosen


def differing_params(runs) -> list[str]:
    """The param keys whose values are not the same in all runs (a key missing from a run counts as a value)."""
    keys = sorted(set().union(*(run.data.params for run in runs)))
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def run_rounds(run) -> list[str]:
    """The run's round keys, in order (the `rounds` tag written by tracking.py)."""
    tag = run.data.tags.get("rounds", "")
    return [key for key in tag.split(",") if key]


def round_steps(run) -> dict[int, str]:
    """{MLflow step: checkpoint name}: 0 = sft, a round's step is its depth in the `from` chain."""
    rounds = run_rounds(run)
    starts = {key: run.data.params.get(f"rounds.{key}.from", "sft") for key in rounds}

    def depth(key, seen=()):
        if key == "sft" or key not in starts or key in seen:
            return 0
        return 1 + depth(starts[key], (*seen, key))

    steps = {0: "sft"}
    for key in rounds:
        steps[depth(key)] = key  # a later round at the same depth wins, as the last round does
    return steps


def metric_by_step(store: Store, run, key: str) -> dict[int, float]:
    return {metric.step: metric.value for metric in store.client.get_metric_history(run.info.run_id, key)}


def final_round(run) -> tuple[str, int]:
    """(name, step) of the run's last round: the last key of its rounds."""
    rounds = run_rounds(run)
    if not rounds:
        return "sft", 0
    steps = {name: step for step, name in round_steps(run).items()}
    return rounds[-1], steps.get(rounds[-1], max(steps.values()))


def param_label(run, keys: list[str]) -> str:
    """`a1b2c3d4 ppo.clip_range=0.1`: the short id and the run's values of the differing params."""
    parts = [f"{key}={run.data.params.get(key, 'unset')}" for key in keys]
    return " ".join([short(run), *parts]) if parts else f"{short(run)} {run.info.run_name}"

