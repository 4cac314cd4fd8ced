"""The `rlhf` commands without a pipeline run: the rounds rewrite, the frontier, stage times, errors.

tests/e2e/test_commands.py runs every command against a real reduced pipeline and MLflow store.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from rlhf_core.config import load_params
from rlhf_core.config.rendering import render_params_yaml
from rlhf_core.tooling.commands import main
from rlhf_core.tooling.commands.rounds import rewrite_rounds


def chain(n):
    return {f"r{i}": {"from": "sft" if i == 1 else f"r{i - 1}"} for i in range(1, n + 1)}


@pytest.mark.parametrize("text", [
    "seed: 0\nrounds: {r1: {from: sft}, r2: {from: r1}}  # two\nppo:\n  lr: 1\n",
    "seed: 0\nrounds:  # the rounds\n  # leading comment\n  r1:\n    from: sft\n  r2:\n    from: r1   # second\n\n"
    "# doc of ppo\nppo:\n  lr: 1\n",
    "seed: 0\r\nrounds:\r\n  r1: {from: sft}\r\nppo:\r\n  lr: 1\r\n",
    "seed: 0\nppo:\n  lr: 1",
    "rounds:\n    a: {from: sft}\n    r2: {from: sft}\nseed: 1\n",
    "seed: 0\nrounds:\n  r1: {from: sft}",
])
@pytest.mark.parametrize("n", [1, 3])
def test_rewrite_rounds_changes_only_the_rounds(text, n):
    new = rewrite_rounds(text, n)
    old_raw, new_raw = yaml.safe_load(text), yaml.safe_load(new)
    assert new_raw.pop("rounds") == chain(n)
    old_raw.pop("rounds", None)
    assert new_raw == old_raw
    # Lines outside the block survive verbatim (comments, CRLF, the missing final newline).
    outside = [line for line in text.splitlines(keepends=True) if not line.startswith((" ", "rounds"))]
    for line in outside:
        assert line in new.splitlines(keepends=True) or line.rstrip("\r\n") == new.splitlines()[-1]
    assert ("\r\n" in new) == ("\r\n" in text)
    assert rewrite_rounds(new, n) == new  # idempotent


def test_rewrite_rounds_keeps_matching_entries_and_their_comments():
    text = "rounds:\n  r1: {from: sft}\n  r2: {from: r1}\n  r3: {from: r2}     # add a line to add a round\n"
    assert rewrite_rounds(text, 4) == text + "  r4: {from: r3}\n"
    assert rewrite_rounds(text, 2) == "rounds:\n  r1: {from: sft}\n  r2: {from: r1}\n"
    assert rewrite_rounds("rounds:\n  r1: {from: r9}\n", 1) == "rounds:\n  r1: {from: sft}\n"


def test_rewrite_rounds_of_the_default_params_file_is_valid(tmp_path):
    text = render_params_yaml()
    path = tmp_path / "params.yaml"
    path.write_text(rewrite_rounds(text, 5))
    assert list(load_params(path).rounds) == ["r1", "r2", "r3", "r4", "r5"]
    assert [line for line in path.read_text().splitlines() if not line.startswith("  r")] == \
        [line for line in text.splitlines() if not line.startswith("  r")]


def run_main(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rounds_command_writes_atomically_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    code, _, err = run_main(capsys, "rounds", "3")
    assert code == 2 and err == f"error: rlhf rounds: {tmp_path / 'params.yaml'}: params file not found; run rlhf " \
                                "from the repository (the folder with dvc.yaml and params.yaml) or pass --params PATH\n"
    path = tmp_path / "params.yaml"
    path.write_text(render_params_yaml())
    path.chmod(0o644)
    code, out, err = run_main(capsys, "rounds", "3")
    assert code == 0, err
    assert out == "params.yaml: rounds r1 from sft, r2 from r1, r3 from r2 (was r1). Next: `dvc repro`.\n"
    assert oct(path.stat().st_mode & 0o777) == "0o644" and not list(tmp_path.glob(".params.yaml.tmp-*"))
    for bad in ("0", "-2"):
        before = path.read_bytes()
        code, out, err = run_main(capsys, "rounds", bad)
        assert code == 2 and out == "" and err.count("\n") == 1 and "must be >= 1" in err
        assert path.read_bytes() == before
    # An invalid params file elsewhere: the validation names it, the file is left as it was.
    path.write_text(path.read_text().replace("clip_range: 0.2", "clip_range: -0.2"))
    before = path.read_bytes()
    code, _, err = run_main(capsys, "rounds", "5")
    assert code == 2 and "ppo.clip_range = -0.2" in err and str(path) in err and ".tmp-" not in err
    assert path.read_bytes() == before


def test_commands_without_a_store_or_rollouts_fail_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(render_params_yaml())
    for command in (["compare"], ["plot"], ["compare", "abc"]):
        code, out, err = run_main(capsys, *command)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'}" in err and "dvc repro" in err
    assert not (tmp_path / "mlflow.db").exists()  # looking does not create an empty store
    code, out, err = run_main(capsys, "samples", "r1")
    assert code == 2 and err == ("error: rlhf samples: round 'r1': rollouts/r1/rollouts.parquet not found; "
                                 "no round has rollouts and scores yet: run `dvc repro`\n")
    code, _, err = run_main(capsys, "samples", "r1", "--worst", "0")
    assert code == 2 and "--worst 0: must be >= 1" in err


def test_samples_orders_and_joins(tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "rollouts/r1").mkdir(parents=True)
    (tmp_path / "scores/r1").mkdir(parents=True)
    totals = [0.5, -0.25, 0.75, 0.0]
    pd.DataFrame({"prompt_index": [0, 0, 1, 1], "sample_index": [0, 1, 0, 1], "prompt": ["p0", "p0", "p1", "p1"],
                  "response": [" good " * 30, " bad", " great", " ok"], "response_length": [60, 2, 2, 2],
                  "ended_with_eos": [False, True, True, True]}).to_parquet(tmp_path / "rollouts/r1/rollouts.parquet")
    # Scores in another row order: the join is on (prompt_index, sample_index), not on position.
    pd.DataFrame({"prompt_index": [1, 1, 0, 0], "sample_index": [1, 0, 1, 0], "eos_penalty": [0.0, 0.0, 0.0, -0.5],
                  "sentiment": [0.0, 0.75, -0.25, 1.0], "total": totals[::-1]}).to_parquet(
        tmp_path / "scores/r1/scores.parquet")
    code, out, err = run_main(capsys, "samples", "r1", "--best", "2", "--width", "60")
    assert code == 0, err
    heads = [line for line in out.splitlines() if line.startswith("#")]
    assert heads == ["#1  total +0.7500  prompt 1  sample 0  2 tokens", "#2  total +0.5000  prompt 0  sample 0  60 tokens, no EOS"]
    assert "reward components: sentiment, eos_penalty;" in out and "    sentiment +1.0000  eos_penalty -0.5000" in out
    assert max(len(line) for line in out.splitlines()[2:]) <= 60  # long responses are wrapped
    code, out, _ = run_main(capsys, "samples", "r1", "--random", "9")
    assert code == 0 and len([line for line in out.splitlines() if line.startswith("#")]) == 4
    code, _, err = run_main(capsys, "samples", "r2")
    assert code == 2 and "rounds with rollouts and scores: r1" in err


def test_samples_show_an_episode_turn_by_turn(tmp_path, monkeypatch, capsys):
    import json

    import pandas as pd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "rollouts/r1").mkdir(parents=True)
    (tmp_path / "scores/r1").mkdir(parents=True)
    messages = [{"role": "user", "content": "What is 37 * 46?"},
                {"role": "assistant", "content": '<tool_call>{"name": "calculator"}</tool_call>'},
                {"role": "tool", "content": "1702"}, {"role": "assistant", "content": "1702"}]
    pd.DataFrame({"prompt_index": [0, 1], "sample_index": [0, 0], "prompt": ["q0", "q1"], "response": ["1702", "9"],
                  "response_length": [30, 8], "ended_with_eos": [True, False], "messages": [json.dumps(messages)] * 2,
                  "turns": [2, 2], "tool_calls": [1, 1], "limit": ["", "max_turns"]}).to_parquet(
        tmp_path / "rollouts/r1/rollouts.parquet")
    pd.DataFrame({"prompt_index": [0, 1], "sample_index": [0, 0], "episode": [1.0, 0.0], "total": [1.0, 0.0]}).to_parquet(
        tmp_path / "scores/r1/scores.parquet")
    code, out, err = run_main(capsys, "samples", "r1", "--best", "2", "--width", "100")
    assert code == 0, err
    heads = [line for line in out.splitlines() if line.startswith("#")]
    assert heads == ["#1  total +1.0000  prompt 0  sample 0  2 turns, 1 tool calls",
                     "#2  total +0.0000  prompt 1  sample 0  2 turns, 1 tool calls, limit max_turns"]
    roles = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    assert roles[:5] == ["user", "assistant", "tool", "assistant", "episode"]
    assert "    tool      1702" in out


def test_frontier_keeps_undominated_points():
    from rlhf_core.tooling.commands.plot import frontier

    points = [(0.0, 0.1), (0.1, 0.3), (0.2, 0.2), (0.3, 0.5), (0.3, 0.4), (0.5, 0.5)]
    assert frontier(points) == [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5)]


def test_stage_times_only_under_dvc(tmp_path, monkeypatch):
    from rlhf_core.runtime import stage_times

    monkeypatch.delenv("DVC_STAGE", raising=False)
    stage_times.record("sft", 3.0, tmp_path)
    assert not (tmp_path / stage_times.FILE).exists()
    monkeypatch.setenv("DVC_STAGE", "sft")
    stage_times.record("sft", 3.0, tmp_path)
    stage_times.record("rollout@r1", 1.5, tmp_path)
    stage_times.record("rollout@r1", 0.5, tmp_path)  # re-run after a failure: both count
    stage_times.record("track", 9.0, tmp_path)  # track logs the others; its own time is not recorded
    with open(tmp_path / stage_times.FILE, "a") as handle:
        handle.write('{"stage": "cut')  # a line cut short by a kill
    assert stage_times.read(tmp_path) == {"sft": 3.0, "rollout@r1": 2.0}
    assert stage_times.metric_name("rollout@r1") == "time.rollout_r1_s"
    stage_times.clear(tmp_path)
    assert stage_times.read(tmp_path) == {}


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys; from rlhf_core.tooling.commands import build_parser; build_parser().format_help(); "
            "import json; print(json.dumps(sorted(m for m in ('mlflow', 'matplotlib', 'pandas', 'torch') if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == []
    result = subprocess.run([sys.executable, "-m", "rlhf_core.tooling.commands", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for command in ("rounds", "compare", "samples", "plot"):
        assert command in result.stdout


def test_compare_cuts_long_params_where_they_differ():
    """score.scorers values share their first 32 characters: cut at the start, every run showed the same cell."""
    from rlhf_core.tooling.commands.compare import _cells

    base = "[{'name': 'task', 'kind': 'task', 'weight': 1.0, 'normalize': 'none'}, {'name': 'len', 'weight': "
    cells = _cells([base + "0.1}]", base + "0.5}]", "short"])
    assert all(len(cell) <= 32 for cell in cells)
    assert cells[0] != cells[1] and "0.1" in cells[0] and "0.5" in cells[1] and cells[2] == "short"
    assert _cells(["a", "b"]) == ["a", "b"]


@pytest.mark.filterwarnings("ignore:Tight layout not applied")
def test_plot_keeps_a_long_legend_inside_the_image(tmp_path):
    """The legend sits right of the axes: with a long run label it was cut at the image's right edge."""
    import types

    import matplotlib.image

    from rlhf_core.tooling.commands.plot import draw

    label = ("a1b2c3d4 ppo.clip_range=0.1 advantages.lam=0.9 algorithm.name=grpo score.scorers=[{'name': 'rm', "
             "'kind': 'hf_classifier', 'model': 'reward_models/bt'}]")  # past ~100 characters tight_layout gives up
    data = [{"label": label, "steps": [0, 1, 2], "names": ["sft", "r1", "r2"], "reward": [0.1, 0.3, 0.5],
             "kl": [0.0, 0.1, 0.3]}]
    paths = draw(types.SimpleNamespace(experiment="rlhf"), data, tmp_path)
    for path in paths:
        right_margin = matplotlib.image.imread(path)[:, -4:, :3]
        assert (right_margin > 0.99).all(), path.name  # the label ends before the edge: a white margin there


def test_exps_runs_dvc_exp_show_without_the_dependency_columns_and_passes_its_exit_code(tmp_path, monkeypatch):
    """Plain `dvc exp show` is ~2,800 characters wide: a column per dependency hash besides params and metrics."""
    from rlhf_core.tooling.commands import exps

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(exps.subprocess, "call", lambda command, cwd: calls.append((command, cwd)) or 3)
    assert main(["exps", "--csv", "--sort-by", "reward"]) == 3
    command, cwd = calls[0]
    assert command[-8:] == ["exp", "show", "--only-changed", "--drop", exps.EXP_SHOW_DROP, "--csv", "--sort-by", "reward"]
    assert cwd == tmp_path
    import re

    dropped = re.compile(exps.EXP_SHOW_DROP)
    for column in ("rlhf_core/config/sections.py", "stages", "models/sft", "fingerprints/code/rollout.json", "configs/accelerate",
                   "evals"):
        assert dropped.match(column), column
    for column in ("reward", "ppo.clip_range", "optim.lr", "kl.reward_coef", "algorithm.name"):
        assert not dropped.match(column), column


def test_stage_measures_throughput_and_peak_memory_outside_the_outputs(tmp_path, monkeypatch, capsys):
    """Generation/training tokens per second and peak memory were reported nowhere; they are machine-dependent,
    so they go to the stage's last line and tracking/stage_times.jsonl (logged to MLflow), never to an output."""
    from rlhf_core.runtime import stage_times
    from rlhf_core.runtime.cli import run_stage

    stage_times.reset_work()
    stage_times.add_work("generation_tokens", 300, 1.5)
    stage_times.add_work("generation_tokens", 100, 0.5)
    assert stage_times.work_rates() == {"generation_tokens_per_s": 200.0}
    assert stage_times.peak_rss_mb() > 10  # this process holds at least the interpreter
    monkeypatch.setenv("DVC_STAGE", "rollout@r1")
    stage_times.record("rollout@r1", 2.0, tmp_path, measures={"generation_tokens_per_s": 200.0, "peak_rss_mb": 640.0})
    stage_times.record("score@r1", 0.5, tmp_path)
    assert stage_times.read_measures(tmp_path) == {"rollout@r1": {"generation_tokens_per_s": 200.0,
                                                                  "peak_rss_mb": 640.0}}
    assert stage_times.read(tmp_path) == {"rollout@r1": 2.0, "score@r1": 0.5}
    assert stage_times.metric_name("rollout@r1", "peak_rss_mb") == "perf.rollout_r1.peak_rss_mb"

    (tmp_path / "params.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE")

    def main(params, args):
        """A stage that trains 5000 tokens in 2 s."""
        stage_times.add_work("training_tokens", 5000, 2.0)

    run_stage(main, name="probe", argv=[])
    assert capsys.readouterr().err.splitlines()[-1].startswith("probe: done in ")  # called in process: no peak RSS
    assert stage_times.work_rates() == {"training_tokens_per_s": 2500.0}  # the work counted from this stage's start
