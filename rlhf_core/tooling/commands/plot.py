"""`rlhf plot [RUN ...]`: reward and KL by round, and the reward-vs-KL frontier, as PNGs logged to the runs.

Each run is one line, named by its short id and its values of the params that differ between the
chosen runs.  The data are the eval metrics tracking.py logs (`eval.reward`, `eval.kl`, step =
round depth, 0 = SFT).  The frontier is the set of checkpoints (any run, any round) that no other
checkpoint beats on both reward (higher) and KL (lower).  Every PNG is logged to every chosen run
under the artifact folder `rlhf_plot/` (a later `rlhf plot` overwrites it there).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_core.errors import DataError, first_line
from rlhf_core.tooling.commands import _common

ARTIFACT_DIR = "rlhf_plot"


def series(store, runs) -> list[dict]:
    """Per run: label, steps, names, reward and KL by step (only steps with both)."""
    keys = _common.differing_params(runs)
    out = []
    for run in runs:
        reward = _common.metric_by_step(store, run, "eval.reward")
        kl = _common.metric_by_step(store, run, "eval.kl")
        steps = sorted(set(reward) & set(kl))
        names = _common.round_steps(run)
        out.append({"run": run, "label": _common.param_label(run, keys), "steps": steps,
                    "names": [names.get(step, str(step)) for step in steps],
                    "reward": [reward[s] for s in steps], "kl": [kl[s] for s in steps]})
    return out


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front of (kl, reward) points: lowest KL first, each with a higher reward than all before it."""
    front = []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or reward > front[-1][1]:
            front.append((kl, reward))
    return front


def _subtitle(store, data) -> str:
    return f"experiment {store.experiment!r}, {len(data)} run(s)"


def draw(store, data, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    paths = []

    def finish(figure, axes, title, xlabel, ylabel, name):
        axes.set_title(f"{title}\n{_subtitle(store, data)}", fontsize=11)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        legend = axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, title="run",
                             title_fontsize=8, alignment="left")
        figure.tight_layout()
        path = out_dir / name
        # the legend sits right of the axes, outside what tight_layout fits into the figure: save the box
        # that holds every artist, legend included, or long run labels are cut at the image's edge
        figure.savefig(path, bbox_inches="tight", bbox_extra_artists=[legend], pad_inches=0.15)
        plt.close(figure)
        paths.append(path)

    steps = sorted({s for d in data for s in d["steps"]})
    tick_names = {}
    for d in data:
        for step, name in zip(d["steps"], d["names"]):
            tick_names.setdefault(step, name)
    for metric, title, ylabel, name in (("reward", "Eval reward by round", "eval reward (mean total)", "reward_vs_round.png"),
                                        ("kl", "KL to the reference by round", "KL(π‖π_ref), nats", "kl_vs_round.png")):
        figure, axes = plt.subplots(figsize=(8.5, 4.5), dpi=110)
        for index, d in enumerate(data):
            axes.plot(d["steps"], d[metric], marker=markers[index % len(markers)], color=colors[index % len(colors)],
                      label=d["label"], linewidth=1.6, markersize=max(9 - 1.5 * index, 3.5))  # overlaps stay visible
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xticks(steps, [f"{s}\n{tick_names[s]}" for s in steps])
        finish(figure, axes, title, "round (0 = SFT)", ylabel, name)

    figure, axes = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    points = []
    for index, d in enumerate(data):
        color = colors[index % len(colors)]
        axes.plot(d["kl"], d["reward"], marker=markers[index % len(markers)], color=color, label=d["label"],
                  linewidth=1.0, alpha=0.8, markersize=max(9 - 1.5 * index, 3.5))
        for kl, reward, round_name in zip(d["kl"], d["reward"], d["names"]):
            axes.annotate(round_name, (kl, reward), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
        points += list(zip(d["kl"], d["reward"]))
    front = frontier(points)
    axes.plot([p[0] for p in front], [p[1] for p in front], color="black", linestyle="--", linewidth=1.2,
              marker="o", markersize=13, markerfacecolor="none", markeredgewidth=1.2,
              label="frontier (no other point has\nhigher reward and lower KL)", zorder=0)
    finish(figure, axes, "Reward against KL to the reference", "KL(π‖π_ref), nats", "eval reward (mean total)",
           "reward_vs_kl.png")
    return paths


def run(args) -> None:
    params = _common.load(args)
    store = _common.open_store(params)
    runs = _common.select_runs(store, args.runs, args.latest)
    data = series(store, runs)
    empty = [_common.short(d["run"]) for d in data if not d["steps"]]
    if len(empty) == len(data):
        raise DataError(f"run(s) {', '.join(empty)} have no eval.reward / eval.kl metrics to plot; "
                        "choose runs logged by the track stage (`rlhf compare` lists them)")
    data = [d for d in data if d["steps"]]
    out_dir = Path(args.out) if args.out else _common.root() / "plots" / "png"
    paths = draw(store, data, out_dir)
    for path in paths:
        print(path)
    if empty:
        print(f"skipped (no eval metrics): {', '.join(empty)}")
    if args.no_log:
        return
    from mlflow.exceptions import MlflowException

    try:
        for d in data:
            for path in paths:
                store.client.log_artifact(d["run"].info.run_id, str(path), ARTIFACT_DIR)
    except (MlflowException, OSError) as exc:
        raise DataError(f"the PNGs are written, but logging them to MLflow failed: {first_line(exc)[:200]}") from None
    print(f"logged to run(s) {', '.join(_common.short(d['run']) for d in data)} as artifacts {ARTIFACT_DIR}/"
          + ", ".join(path.name for path in paths))
