"""Progress of the long loops (SFT steps, generation batches, PPO minibatches, evaluation).

On a terminal it is a tqdm bar with an ETA and the live loss / reward / KL.  Elsewhere (CI, DVC's
captured logs, a pipe) it is plain lines, at most one every ``every_seconds`` plus one at the end:

    sft epoch 1/3: 45/90 steps (50%), 12s elapsed, ETA 12s, loss 1.2345

``RLHF_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off``.  Progress goes to stderr, as
every stage's log does.
"""

from __future__ import annotations

import os
import sys
import time


def _mode(stream) -> str:
    chosen = os.environ.get("RLHF_PROGRESS", "").strip().lower()
    if chosen in ("bar", "lines", "off"):
        return chosen
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``with Progress(total, "sft epoch 1/3", unit="step") as bar: ... bar.update(loss=...)``."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", every_seconds: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.every_seconds = int(total), desc, unit, every_seconds
        self.stream = stream or sys.stderr
        self.mode = _mode(self.stream)
        self.done, self.postfix = 0, {}
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n`` units; ``postfix`` values (loss=…, reward=…) are shown next to the count."""
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _format_value(v) for k, v in self.postfix.items()}, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self.last_line >= self.every_seconds or self.done >= self.total:
                self.last_line = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        fraction = self.done / self.total if self.total else 1.0
        eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}s ({fraction:.0%})", f"{elapsed:.0f}s elapsed"]
        if self.done < self.total:
            parts.append(f"ETA {eta:.0f}s")
        parts += [f"{k} {_format_value(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
