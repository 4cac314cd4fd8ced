"""What happens when data, checkpoints or numbers go bad: every case stops the stage with one line
that names the stage (and round), exits 2, and leaves no partial output."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO

from rlhf_core.runtime.cli import run_stage


def stage_error(capsys, module, name: str, *argv: str, needs_round: bool = False) -> str:
    """Run a stage in process; assert exit code 2 and a single stderr line; return that line."""
    capsys.readouterr()  # drop what earlier (successful) stages printed
    with pytest.raises(SystemExit) as exit_info:
        run_stage(module.main, name=name, needs_round=needs_round, argv=list(argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {name}")
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_checkpoint):
    """A working directory with small params, prompts and an SFT snapshot of the tiny model."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["rollout"].update(prompts_per_round=4, samples_per_prompt=2, max_new_tokens=6)
    raw["optim"].update(epochs=1, minibatch_size=8, micro_batch_size=4)
    raw["rounds"] = {"r1": {"from": "sft"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "prompts").mkdir()
    pd.DataFrame({"prompt": ["The pizza was", "The laptop seemed", "So far the movie is", "The room felt"]}).to_parquet(
        tmp_path / "prompts/train.parquet", index=False)
    shutil.copytree(tiny_checkpoint, tmp_path / "models/sft")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(workdir, **sections):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))


def test_empty_prompt_set(workdir, capsys):
    from stages import prepare

    (workdir / "empty.csv").write_text("prompt\n")
    set_params(workdir, prepare={"source": "file", "path": "empty.csv"})
    shutil.rmtree(workdir / "prompts")
    line = stage_error(capsys, prepare, "prepare")
    assert "0 usable prompt(s)" in line
    assert not (workdir / "prompts").exists()


def test_prompt_longer_than_the_context(workdir, capsys):
    from stages import rollout

    pd.DataFrame({"prompt": ["word " * 200] * 4}).to_parquet(workdir / "prompts/train.parquet", index=False)
    line = stage_error(capsys, rollout, "rollout", "--round", "r1", needs_round=True)
    assert line.startswith("error: rollout@r1: train prompts: prompt row 0 has ")
    assert "exceeds the model's context of 96 tokens" in line
    assert not (workdir / "rollouts").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_bad_parquet_input(workdir, capsys, damage):
    from stages import rollout, score

    run_stage(rollout.main, name="rollout", needs_round=True, argv=["--round", "r1"])
    table = workdir / "rollouts/r1/rollouts.parquet"
    if damage == "garbage":
        table.write_bytes(b"this is not parquet at all")
    elif damage == "truncated":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    else:
        table.unlink()
    line = stage_error(capsys, score, "score", "--round", "r1", needs_round=True)
    expected = "file not found" if damage == "missing" else "not a readable Parquet file"
    assert line.startswith("error: score@r1: rollouts/r1/rollouts.parquet: ") and expected in line
    assert not (workdir / "scores").exists()


def test_checkpoint_without_weights(workdir, capsys):
    from stages import rollout

    (workdir / "models/sft/model.safetensors").unlink()
    line = stage_error(capsys, rollout, "rollout", "--round", "r1", needs_round=True)
    assert "model 'models/sft': cannot be loaded from safetensors weights" in line
    assert not (workdir / "rollouts").exists()


def test_pickle_checkpoint_is_refused(workdir, capsys):
    """A checkpoint that carries its weights as a pickle (.bin) is never unpickled."""
    from safetensors.torch import load_file

    from stages import rollout

    weights = load_file(str(workdir / "models/sft/model.safetensors"))
    torch.save(weights, workdir / "models/sft/pytorch_model.bin")
    (workdir / "models/sft/model.safetensors").unlink()
    line = stage_error(capsys, rollout, "rollout", "--round", "r1", needs_round=True)
    assert "pickle checkpoints (.bin/.pt) are refused" in line


def test_nan_reward_names_scorer_round_and_row(workdir, capsys, monkeypatch):
    from rlhf_core.phases import scoring
    from stages import rollout, score

    run_stage(rollout.main, name="rollout", needs_round=True, argv=["--round", "r1"])
    monkeypatch.setattr(scoring, "vader_scores", lambda texts: [0.5] * (len(texts) - 1) + [float("nan")])
    line = stage_error(capsys, score, "score", "--round", "r1", needs_round=True)
    assert line.startswith("error: score@r1: scorer task returned nan for row 7")
    assert not (workdir / "scores").exists()


def test_nan_weights_stop_the_rollout(workdir, capsys):
    from safetensors.torch import load_file, save_file

    from stages import rollout

    path = workdir / "models/sft/model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in weights if "layers.0" in k and k.endswith("weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path), metadata={"format": "pt"})
    line = stage_error(capsys, rollout, "rollout", "--round", "r1", needs_round=True)
    assert "NaN/inf" in line
    assert not (workdir / "rollouts").exists()


def test_diverging_learning_rate_stops_the_update(workdir, capsys):
    from stages import advantages, optimize, rollout, score

    for module, name in ((rollout, "rollout"), (score, "score"), (advantages, "advantages")):
        run_stage(module.main, name=name, needs_round=True, argv=["--round", "r1"])
    set_params(workdir, optim={"lr": 1e30, "epochs": 4, "minibatch_size": 4, "micro_batch_size": 4}, ppo={"target_kl": None})
    line = stage_error(capsys, optimize, "optimize", "--round", "r1", needs_round=True)
    assert "is nan" in line or "is inf" in line or "NaN/inf" in line, line
    assert not (workdir / "models/r1").exists()
    assert not (workdir / "metrics/r1/optimize.json").exists()


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
])
def test_a_full_disk_while_writing_the_checkpoint_is_one_line_and_writes_nothing(workdir, capsys, monkeypatch, failure):
    """A full disk used to end optimize with a traceback; the atomic writer already left nothing half-written."""
    import transformers.modeling_utils

    from stages import advantages, optimize, rollout, score

    for stage, name in ((rollout, "rollout"), (score, "score"), (advantages, "advantages")):
        run_stage(stage.main, name=name, needs_round=True, argv=["--round", "r1"])

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_stage(optimize.main, name="optimize", needs_round=True, argv=["--round", "r1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1].startswith("error: optimize@r1: no space left on the device while writing its outputs")
    assert not (workdir / "models/r1").exists()
    assert not [p for p in (workdir / "models").iterdir() if p.name.startswith(".")]  # no temporary directory left
