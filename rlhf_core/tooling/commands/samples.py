"""`rlhf samples ROUND [--worst N | --best N | --random N]`: what the policy wrote and how it was scored.

Reads rollouts/ROUND/rollouts.parquet (prompt, response) and scores/ROUND/scores.parquet (one column
per reward component, the EOS penalty and the total), joined on (prompt_index, sample_index).
Default: 5 random samples with --seed 0; --worst is sorted by total ascending, --best descending.
Episodes (an environment's multi-turn rollouts) are shown turn by turn, each message under its role, with their
turns, tool calls and the limit that ended them, if any.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.tooling.commands import _common
from rlhf_core.tooling.commands._common import DEFAULT_SAMPLES

KEYS = ("prompt_index", "sample_index")
EPISODE = ("messages", "turns", "tool_calls", "limit")  # the rollout table's episode columns shown


def rounds_on_disk(repo: Path) -> list[str]:
    """Rounds with both a rollouts and a scores Parquet file, in params order where known."""
    found = sorted(path.parent.name for path in (repo / "rollouts").glob("*/rollouts.parquet")
                   if (repo / "scores" / path.parent.name / "scores.parquet").is_file())
    return sorted(found, key=lambda key: (len(key), key))


def load_round(repo: Path, round_key: str):
    """The joined table of one round; one-line errors for an unknown round or a missing file."""
    from rlhf_core.io import read_parquet

    rollouts_path = repo / "rollouts" / round_key / "rollouts.parquet"
    scores_path = repo / "scores" / round_key / "scores.parquet"
    if not rollouts_path.is_file() or not scores_path.is_file():
        available = rounds_on_disk(repo)
        missing = rollouts_path if not rollouts_path.is_file() else scores_path
        hint = f"rounds with rollouts and scores: {', '.join(available)}" if available else \
            "no round has rollouts and scores yet: run `dvc repro`"
        if round_key == "sft":
            raise DataError(f"round 'sft': the SFT snapshot has no rollouts (see samples/eval.jsonl); {hint}")
        raise DataError(f"round {round_key!r}: {missing.relative_to(repo)} not found; {hint}")
    rollouts = read_parquet(rollouts_path, (*KEYS, "prompt", "response"))
    scores = read_parquet(scores_path, (*KEYS, "total"))
    keep = [c for c in (*KEYS, "prompt", "response", "answer", "response_length", "ended_with_eos", *EPISODE)
            if c in rollouts]
    table = rollouts[keep].merge(scores, on=list(KEYS), how="inner", validate="one_to_one")
    if len(table) != len(rollouts):
        raise DataError(f"round {round_key!r}: {len(rollouts)} rollouts but {len(table)} match a score on "
                        f"{', '.join(KEYS)}; re-run its score stage (dvc repro -f score@{round_key})")
    components = [c for c in scores.columns if c not in (*KEYS, "total", "eos_penalty")]
    components += ["eos_penalty"] if "eos_penalty" in scores.columns else []
    return table, components


def pick(table, how: str, n: int, seed: int):
    if how == "worst":
        return table.sort_values(["total", *KEYS], ascending=True, kind="stable").head(n)
    if how == "best":
        return table.sort_values(["total", *KEYS], ascending=[False, True, True], kind="stable").head(n)
    return table.sample(n=min(n, len(table)), random_state=seed)


def _wrap(label: str, text: str, width: int) -> list[str]:
    prefix = f"    {label:<10}"
    lines = []
    for paragraph in (text.splitlines() or [""]):
        lines += textwrap.wrap(paragraph, width=width, initial_indent=prefix if not lines else " " * len(prefix),
                               subsequent_indent=" " * len(prefix), replace_whitespace=False,
                               drop_whitespace=True) or [prefix.rstrip() if not lines else ""]
    return lines


def run(args) -> None:
    how, n = "random", DEFAULT_SAMPLES
    for option in ("worst", "best", "random"):
        if getattr(args, option) is not None:
            how, n = option, getattr(args, option)
    if n < 1:
        raise ConfigError(f"--{how} {n}: must be >= 1")
    repo = _common.root()
    table, components = load_round(repo, args.round)
    chosen = pick(table, how, n, args.seed)
    width = args.width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    what = {"worst": "lowest total first", "best": "highest total first", "random": f"random, --seed {args.seed}"}[how]
    prompts = table["prompt_index"].nunique()
    print(f"round {args.round}: {len(chosen)} of {len(table)} samples ({prompts} prompts), {what}")
    print(f"reward components: {', '.join(components)}; total: their weighted sum, the reward trained on "
          f"(mean {table['total'].mean():.4f}, min {table['total'].min():.4f}, max {table['total'].max():.4f})")
    for rank, (_, row) in enumerate(chosen.iterrows(), start=1):
        print()
        parts = [f"#{rank}", f"total {row['total'] + 0.0:+.4f}", f"prompt {int(row['prompt_index'])}",
                 f"sample {int(row['sample_index'])}"]
        if "messages" in row:
            parts.append(f"{int(row['turns'])} turns, {int(row['tool_calls'])} tool calls"
                         + (f", limit {row['limit']}" if row["limit"] else ""))
        elif "response_length" in row:
            parts.append(f"{int(row['response_length'])} tokens" + ("" if row.get("ended_with_eos", True) else ", no EOS"))
        print("  ".join(parts))
        if "messages" in row:  # an episode, turn by turn
            import json

            for message in json.loads(row["messages"]):
                print("\n".join(_wrap(message["role"], message["content"].strip(), width)))
        else:
            print("\n".join(_wrap("prompt", str(row["prompt"]), width)))
            print("\n".join(_wrap("response", str(row["response"]).strip(), width)))
        if "answer" in row:
            print("\n".join(_wrap("answer", str(row["answer"]), width)))
        print("    " + "  ".join(f"{name} {row[name] + 0.0:+.4f}" for name in components))  # + 0.0: no -0.0000
