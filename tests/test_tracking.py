import json
from pathlib import Path

import pytest

from rlhf_core.config import Params, RoundParams, TrackingParams, replace
from rlhf_core.tooling.tracking import collect_history, pipeline_state, tracking_uri

PARAMS = replace(Params(), rounds={"r1": RoundParams(start_from="sft"), "r2": RoundParams(start_from="r1")})


def test_tracking_uri_defaults_to_the_repo_root_also_from_a_dvc_temp_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_copy.mkdir(parents=True)
    (temp_copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(temp_copy)
    assert tracking_uri(PARAMS) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    custom = replace(PARAMS, tracking=TrackingParams(tracking_uri="http://127.0.0.1:5000"))
    assert tracking_uri(custom) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(custom) == "sqlite:////elsewhere.db"


def _metrics(directory: Path, reward: float) -> Path:
    (directory / "r1").mkdir(parents=True, exist_ok=True)
    (directory / "eval.json").write_text(json.dumps({"sft": {"reward": 0.1}, "r1": {"reward": reward},
                                                     "r2": {"reward": reward + 0.1}}))
    (directory / "r1" / "optimize.json").write_text(json.dumps({"policy_loss": -0.5, "early_stopped": False}))
    return directory


def test_history_is_keyed_by_round_number(tmp_path):
    (tmp_path / "reward_models").mkdir()
    (tmp_path / "reward_models" / "bt.json").write_text(json.dumps({"heldout_pair_accuracy": 0.95, "epochs": 1}))
    history = collect_history(PARAMS, _metrics(tmp_path, 0.4))
    assert history[0] == {"eval/reward": 0.1, "reward_model/bt/heldout_pair_accuracy": 0.95,
                          "reward_model/bt/epochs": 1.0}
    assert history[1] == {"eval/reward": 0.4, "optimize/policy_loss": -0.5, "optimize/early_stopped": 0.0}
    assert history[2] == {"eval/reward": pytest.approx(0.5)}


def test_pipeline_state_changes_with_params_code_and_results(tmp_path):
    metrics = _metrics(tmp_path, 0.4)
    state = pipeline_state(PARAMS, "abc", metrics)
    assert state == pipeline_state(PARAMS, "abc", metrics)
    assert state != pipeline_state(PARAMS, "abd", metrics)
    assert state != pipeline_state(replace(PARAMS, seed=1), "abc", metrics)
    _metrics(tmp_path, 0.45)
    assert state != pipeline_state(PARAMS, "abc", metrics)


def test_log_pipeline_run_logs_once_per_state(tmp_path, monkeypatch):
    import mlflow

    from rlhf_core.tooling.tracking import log_pipeline_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    _metrics(tmp_path / "metrics", 0.4)
    sample = tmp_path / "samples.jsonl"
    sample.write_text('{"response": "great"}\n')
    first_run = log_pipeline_run(PARAMS, workdir=tmp_path, artifacts=[sample], log=lambda *_: None)
    again = log_pipeline_run(PARAMS, workdir=tmp_path, artifacts=[sample], log=lambda *_: None)
    assert first_run["created"] and not again["created"]
    assert again["run_id"] == first_run["run_id"] and again["pipeline_state"] == first_run["pipeline_state"]
    first = first_run["run_id"]
    monkeypatch.setenv("DVC_EXP_NAME", "brave-newt")
    other = log_pipeline_run(replace(PARAMS, seed=3), workdir=tmp_path, artifacts=[], log=lambda *_: None,
                             stage_seconds={"rollout@r1": 2.0},
                             stage_measures={"rollout@r1": {"generation_tokens_per_s": 1500.0, "peak_rss_mb": 640.0}})["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rlhf"])
    assert set(runs["run_id"]) == {first, other}
    named = runs.set_index("run_id")
    assert named.loc[other, "tags.dvc_exp_name"] == "brave-newt"
    assert named.loc[first, "tags.dvc_exp_name"] == "workspace"
    assert named.loc[first, "params.seed"] == "0" and named.loc[other, "params.seed"] == "3"
    # kl.*_coef: auto, shown as the algorithm resolved it (ppo: KL in the reward), so that compare sees it
    assert named.loc[first, "params.kl.reward_coef"] == "auto (0.05)" and named.loc[first, "params.kl.loss_coef"] == "auto (0)"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(first, "eval.reward")]
    assert sorted(steps) == [0, 1, 2]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(first)] == ["samples.jsonl"]
    assert (tmp_path / "mlartifacts").is_dir()
    logged = mlflow.MlflowClient().get_run(other).data.metrics
    assert logged["time.rollout_r1_s"] == 2.0 and logged["perf.rollout_r1.generation_tokens_per_s"] == 1500.0
    assert logged["perf.rollout_r1.peak_rss_mb"] == 640.0
