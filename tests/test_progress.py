"""Progress: a tqdm bar on a terminal, plain lines with an ETA elsewhere, nothing when switched off."""

from __future__ import annotations

import io

import pytest

from rlhf_core.runtime.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_when_not_a_terminal_with_eta_and_live_values(monkeypatch):
    monkeypatch.delenv("RLHF_PROGRESS", raising=False)
    clock = iter([0.0, 5.0, 12.0, 13.0, 30.0])  # the start, then one reading per update
    monkeypatch.setattr("rlhf_core.runtime.progress.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    with Progress(4, "sft", unit="step", every_seconds=10.0, stream=stream) as progress:
        assert progress.mode == "lines"
        for loss in (2.0, 1.5, 1.25, 1.0):
            progress.update(loss=loss)
    lines = stream.getvalue().splitlines()
    # t=5: too soon; t=12: a line (2 of 4 done after 12 s → ETA 12 s); t=13: too soon; t=30: the last step
    assert lines == ["sft: 2/4 steps (50%), 12s elapsed, ETA 12s, loss 1.5",
                     "sft: 4/4 steps (100%), 30s elapsed, loss 1"]
    assert "\r" not in stream.getvalue()


def test_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("RLHF_PROGRESS", raising=False)
    stream = FakeTerminal()
    with Progress(3, "generate", unit="sequence", stream=stream) as progress:
        assert progress.mode == "bar"
        progress.update(2, reward=0.5)
        progress.update(1)
    text = stream.getvalue()
    assert "generate" in text and "3/3" in text and "reward=0.5" in text and "\r" in text


@pytest.mark.parametrize("mode", ["off", "lines"])
def test_environment_overrides_the_choice(monkeypatch, mode):
    monkeypatch.setenv("RLHF_PROGRESS", mode)
    stream = FakeTerminal()
    with Progress(2, "evaluate", unit="checkpoint", stream=stream) as progress:
        progress.update(2, kl=0.1)
    assert progress.mode == mode
    assert stream.getvalue() == ("" if mode == "off" else "evaluate: 2/2 checkpoints (100%), 0s elapsed, kl 0.1\n")
