"""`rlhf compare [RUN ...]`: the chosen MLflow runs side by side, only the params that differ.

Numbers are the eval metrics (`eval.reward`, `eval.kl`, `eval.perplexity`, logged by tracking.py with
step = round depth) of each run's last round, and `time.total_s`: the wall time of the stages that
ran to produce the run (stages DVC kept from its cache count 0; runs logged before this metric
existed show `-`).
"""

from __future__ import annotations

import datetime

from rlhf_core.tooling.commands import _common

METRICS = (("reward", "eval.reward", "{:.4f}"), ("KL", "eval.kl", "{:.4f}"), ("perplexity", "eval.perplexity", "{:.3f}"))


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _cells(values: list, limit: int = 32) -> list[str]:
    """One param's values across runs, each at most ``limit`` characters.  A long value is cut around where
    the values first differ, not at its start: long lists such as ``score.scorers`` often share their first
    ``limit`` characters and differ further on, and cutting them all at the start would hide the difference
    the table exists to show."""
    values = [str(value) for value in values]
    if all(len(value) <= limit for value in values):
        return values
    long_values = [value for value in values if len(value) > limit]
    first_difference = 0
    while len(long_values) > 1 and len({value[first_difference:first_difference + 1] for value in long_values}) == 1 \
            and first_difference < max(map(len, long_values)):
        first_difference += 1
    start = max(0, min(first_difference - limit // 4, max(map(len, long_values)) - limit))
    cells = []
    for value in values:
        if len(value) <= limit:
            cells.append(value)
            continue
        head = "…" if start > 0 else ""
        window = value[start:start + limit - len(head)]
        tail = "…" if start + len(window) < len(value) else ""
        cells.append(head + window[: limit - len(head) - len(tail)] + tail)
    return cells


def table(store, runs) -> tuple[list[list[str]], list[str]]:
    """Rows of the table (runs are columns: first cell the row's label) and the differing param keys."""
    keys = _common.differing_params(runs)
    finals = [_common.final_round(run) for run in runs]
    rows = [["run", *(_common.short(run) for run in runs)],
            ["name", *(run.info.run_name or "-" for run in runs)],
            ["started", *(datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
                          for run in runs)]]
    rows += [[key, *_cells([run.data.params.get(key, "-") for run in runs])] for key in keys]
    rows.append(["round", *(name for name, _ in finals)])
    for label, key, fmt in METRICS:
        cells = []
        for run, (_, step) in zip(runs, finals):
            value = _common.metric_by_step(store, run, key).get(step, run.data.metrics.get(key))
            cells.append("-" if value is None else fmt.format(value + 0.0))  # + 0.0: no -0.0000
        rows.append([label, *cells])
    rows.append(["wall", *(format_seconds(run.data.metrics.get("time.total_s")) for run in runs)])
    return rows, keys


def render(rows: list[list[str]], rules_after: set[int]) -> str:
    """Left-aligned label column, right-aligned run columns, a rule under the given row indices."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip())
        if index in rules_after:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> None:
    params = _common.load(args)
    store = _common.open_store(params)
    runs = _common.select_runs(store, args.runs, args.latest)
    rows, keys = table(store, runs)
    which = "chosen" if args.runs else "latest"
    print(f"{len(runs)} {which} run(s) of experiment {store.experiment!r} ({store.uri})")
    if len(runs) == 1:
        print("params: one run, nothing to compare")
    elif keys:
        print(f"params: the {len(keys)} that differ between the runs")
    else:
        print("params: the same in all runs")
    print("reward, KL, perplexity: eval metrics of each run's last round; wall: time of the stages that ran for it")
    print()
    print(render(rows, {2, 2 + len(keys)}))
