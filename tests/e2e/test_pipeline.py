"""End to end: the real `dvc repro` / `dvc exp run` on a reduced pipeline in a temporary copy of the repo.

One module-scoped copy runs, in order: `dvc repro` (2 rounds, tiny model), a no-op `dvc repro`,
`dvc exp run -S ppo.clip_range=0.1` and `dvc exp run -S advantages.lam=0.9`; the tests then check
what re-ran, the metrics, the artifacts and the MLflow runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.config import params_from_dict
from rlhf_core.config.rendering import render_params_yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

REDUCED = {
    "prepare": {"num_builtin_prompts": 300},
    "sft": {"tiny": {"vocab_size": 400, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
            "num_builtin_demonstrations": 1200, "epochs": 2, "lr": 1e-2, "batch_size": 32, "max_length": 48},
    "rollout": {"prompts_per_round": 16, "samples_per_prompt": 2, "max_new_tokens": 12},
    "optim": {"epochs": 1, "minibatch_size": 16, "micro_batch_size": 8},
    "evaluate": {"num_prompts": 16, "samples_per_prompt": 1, "max_new_tokens": 12, "num_perplexity_texts": 40},
    "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}},
}


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "rounds":
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def dvc(args: list[str], cwd: Path) -> str:
    """Run a dvc command; return its combined output (fail the test with it on error)."""
    exe = shutil.which("dvc")
    command = [exe, *args] if exe else [sys.executable, "-m", "dvc", *args]
    # its own process group: past the timeout every stage process it started goes too (subprocess.run's timeout
    # killed dvc alone, and an orphaned stage went on using the cores of the tests after it)
    process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # the launcher forwards it to a warm-started stage
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        raise AssertionError(f"dvc {' '.join(args)} ran past 900 s:\n{(stdout + stderr)[-5000:]}") from None
    output = stdout + stderr
    assert process.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-5000:]}"
    return output


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="e2e", GIT_AUTHOR_EMAIL="e2e@example.com", GIT_COMMITTER_NAME="e2e",
               GIT_COMMITTER_EMAIL="e2e@example.com", DVC_NO_ANALYTICS="1")
    return env


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_reduced_repo(workdir: Path, changes: dict | None = None, reduced: dict = REDUCED,
                      user_files: dict[str, str] | None = None) -> Path:
    """A git + DVC copy of this repository with the ``reduced`` params (``{}``: the repository's own), then
    ``changes`` (no outputs, no dvc.lock), plus the user's own ``user_files`` {path: text}."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        source = REPO / name
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/", "samples/")) or not source.is_file():
            continue
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, workdir / name)
    raw = deep_update(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), reduced), changes or {})
    (workdir / "params.yaml").write_text(render_params_yaml(params_from_dict(raw)))
    for name, text in (user_files or {}).items():
        (workdir / name).write_text(text)
    for git_args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "reduced pipeline"]):
        subprocess.run(["git", *git_args], cwd=workdir, env=_env(), check=True)
    return workdir


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = make_reduced_repo(tmp_path_factory.mktemp("pipeline"))
    outputs = {"repro": dvc(["repro"], workdir)}
    outputs["eval_after_repro"] = json.loads((workdir / "metrics/eval.json").read_text())
    outputs["noop"] = dvc(["repro"], workdir)
    # A fresh clone has no tracking/run.json (it is not in git): `dvc repro` must log to the clone's
    # own MLflow store even when every other stage is up to date.
    outputs["run_json"] = json.loads((workdir / "tracking/run.json").read_text())
    (workdir / "tracking/run.json").unlink()
    outputs["clone_like"] = dvc(["repro"], workdir)
    outputs["lock_first"] = yaml.safe_load((workdir / "dvc.lock").read_text())
    # Same params and seed, every stage again from scratch: outputs must be byte-identical.
    outputs["forced"] = dvc(["repro", "-f"], workdir)
    outputs["lock_forced"] = yaml.safe_load((workdir / "dvc.lock").read_text())
    outputs["clip"] = dvc(["exp", "run", "-S", "ppo.clip_range=0.1"], workdir)
    outputs["lam"] = dvc(["exp", "run", "-S", "advantages.lam=0.9"], workdir)
    # grpo as in its paper: no KL in the reward, k3 KL in the loss; π_ref is still used, so round 1's rollouts stay
    outputs["grpo"] = dvc(["exp", "run", "-S", "algorithm.name=grpo", "-S", "kl.reward_coef=0", "-S", "kl.loss_coef=0.04"],
                          workdir)
    # --temp runs in <root>/.dvc/tmp/exps/<tmp>; its MLflow run must still land in <root>/mlflow.db.
    outputs["temp"] = dvc(["exp", "run", "--temp", "-S", "evaluate.seed=7"], workdir)
    # One more round: only its own stages, its evaluation and the summary run (each checkpoint has its own
    # cached evaluation; a single evaluate stage re-evaluated every checkpoint).
    subprocess.run([sys.executable, "-m", "rlhf_core.tooling.commands", "rounds", "3"], cwd=workdir, env=_env(), check=True,
                   capture_output=True)
    outputs["third_round"] = dvc(["repro"], workdir)
    outputs["eval_after_third"] = json.loads((workdir / "metrics/eval.json").read_text())
    # An edit to one module: the stages whose code fingerprint lists it re-run, and nothing else.
    with open(workdir / "rlhf_core/rl/advantages.py", "a") as handle:
        handle.write("\n# an edit that changes no behaviour\n")
    outputs["code_edit"] = dvc(["repro"], workdir)
    outputs["code_fingerprints"] = {path.stem: json.loads(path.read_text())
                                    for path in (workdir / "fingerprints/code").glob("*.json")}
    return workdir, outputs


# fingerprints is always_changed: it runs (under a second) on every repro, and what follows it re-runs only
# when a fingerprint it depends on changed.
ALWAYS = {"fingerprints"}
ALL_STAGES = {"prepare", "sft", "rollout@r1", "score@r1", "advantages@r1", "optimize@r1", "rollout@r2", "score@r2",
              "advantages@r2", "optimize@r2", "evaluate_sft", "evaluate@r1", "evaluate@r2", "eval_summary",
              "track"} | ALWAYS


def test_repro_runs_every_stage_once_then_nothing(pipeline):
    _, outputs = pipeline
    assert ran_stages(outputs["repro"]) == ALL_STAGES
    assert ran_stages(outputs["noop"]) == ALWAYS


def test_without_tracking_record_only_track_reruns(pipeline):
    _, outputs = pipeline
    assert outputs["run_json"]["created"] is True and len(outputs["run_json"]["run_id"]) == 32
    assert ran_stages(outputs["clone_like"]) == ALWAYS | {"track"}
    assert "already logged as run " + outputs["run_json"]["run_id"] in outputs["clone_like"]


def output_md5s(lock: dict) -> dict[str, str]:
    """md5 of every output in dvc.lock, except the MLflow run record (it names the run it created)."""
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"] != "tracking/run.json"}


def test_from_scratch_runs_are_byte_identical(pipeline):
    """`dvc repro -f` with the same params and seed reproduces every output bit for bit (CPU)."""
    _, outputs = pipeline
    assert ran_stages(outputs["forced"]) == ALL_STAGES
    first, forced = output_md5s(outputs["lock_first"]), output_md5s(outputs["lock_forced"])
    assert len(first) >= 15 and first == forced


def test_clip_range_reruns_optimize_r1_and_what_follows_only(pipeline):
    _, outputs = pipeline
    assert ran_stages(outputs["clip"]) == ALWAYS | {"optimize@r1", "rollout@r2", "score@r2", "advantages@r2",
                                                    "optimize@r2", "evaluate@r1", "evaluate@r2", "eval_summary",
                                                    "track"}  # not evaluate_sft: the SFT snapshot is unchanged


def test_lam_reuses_round_one_rollout_and_score(pipeline):
    _, outputs = pipeline
    ran = ran_stages(outputs["lam"])
    assert "rollout@r1" not in ran and "score@r1" not in ran
    assert {"advantages@r1", "optimize@r1", "advantages@r2", "evaluate@r2", "eval_summary", "track"} <= ran


def test_switching_algorithm_keeps_round_one_rollout_and_score(pipeline):
    workdir, outputs = pipeline
    ran = ran_stages(outputs["grpo"])
    assert "rollout@r1" not in ran and "score@r1" not in ran
    assert {"advantages@r1", "optimize@r1", "rollout@r2", "optimize@r2", "evaluate@r2", "eval_summary", "track"} <= ran
    state = json.loads((workdir / "models/r2/rlhf_state.json").read_text())
    assert state["algorithm"] == "grpo"


def test_a_new_round_evaluates_only_itself(pipeline):
    _, outputs = pipeline
    assert ran_stages(outputs["third_round"]) == ALWAYS | {"rollout@r3", "score@r3", "advantages@r3", "optimize@r3",
                                                          "evaluate@r3", "eval_summary", "track"}
    assert set(outputs["eval_after_third"]) == {"sft", "r1", "r2", "r3"}


def test_temp_experiment_reruns_only_evaluation(pipeline):
    _, outputs = pipeline
    assert ran_stages(outputs["temp"]) == ALWAYS | {"evaluate_sft", "evaluate@r1", "evaluate@r2", "eval_summary", "track"}


def test_eval_metrics_shape_and_values(pipeline):
    _, outputs = pipeline
    evaluation = outputs["eval_after_repro"]
    assert list(evaluation) == ["r1", "r2", "sft"]  # sorted keys; one entry per checkpoint
    for name, metrics in evaluation.items():
        for key in ("reward", "kl", "perplexity", "distinct_1", "distinct_2", "length"):
            assert math.isfinite(metrics[key]), (name, key)
    assert evaluation["sft"]["kl"] == 0.0
    assert evaluation["r1"]["perplexity"] > 1.0


def test_rlhf_exps_is_a_readable_table_of_dvc_exp_show(pipeline):
    """One DVC metric file (the summary) and, with --only-changed, only the params that differ; plain `dvc exp show`
    has a column for every dependency hash as well."""
    import csv
    import io

    from rlhf_core.tooling.commands.exps import EXP_SHOW_DROP

    assert "rlhf exps" in (REPO / "README.md").read_text()
    workdir, _ = pipeline
    result = subprocess.run([sys.executable, "-m", "rlhf_core.tooling.commands", "exps", "--csv"], cwd=workdir, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    columns = list(next(csv.DictReader(io.StringIO(result.stdout))))
    assert len(columns) <= 25, columns
    assert {"reward", "reward_gain", "kl", "perplexity", "ppo.clip_range", "advantages.lam", "algorithm.name"} <= set(columns)
    assert not [c for c in columns if c.startswith("metrics/")], columns  # no per-round diagnostics columns
    plain = list(next(csv.DictReader(io.StringIO(dvc(["exp", "show", "--csv"], workdir)))))
    assert len(plain) > 3 * len(columns), len(plain)
    assert any(column.startswith("fingerprints/") for column in plain) and EXP_SHOW_DROP.startswith("^(fingerprints|")


def test_outputs_are_versioned_artifacts(pipeline):
    workdir, _ = pipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("sft", "r1", "r2"):
        AutoModelForCausalLM.from_pretrained(workdir / "models" / name)
        tokenizer = AutoTokenizer.from_pretrained(workdir / "models" / name)
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    optimize = json.loads((workdir / "metrics/r1/optimize.json").read_text())
    assert optimize["first_minibatch_ratio_max_deviation"] < 1e-5
    assert abs(optimize["first_minibatch_approx_kl"]) < 1e-7
    table = (workdir / "plots/eval_by_round.csv").read_text().splitlines()
    assert table[0].startswith("round,step,reward") and len(table) == 5  # sft, r1, r2 and the added r3
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())
    assert {"rollout@r1", "optimize@r2", "evaluate@r2", "eval_summary"} <= set(lock["stages"])


def test_one_mlflow_run_per_pipeline_state(pipeline):
    workdir, _ = pipeline
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rlhf"])
    # repro, clip_range, lam, grpo, the --temp run (logged to the root database, not the temp copy) and the
    # repro with a third round (on the workspace the grpo experiment left)
    assert len(runs) == 6, runs[["run_id", "tags.dvc_exp_name"]]
    assert sorted(runs["params.ppo.clip_range"]) == ["0.1", "0.1", "0.1", "0.1", "0.1", "0.2"]
    assert sorted(runs["params.algorithm.name"]) == ["grpo", "grpo", "grpo", "ppo", "ppo", "ppo"]
    assert sorted(runs["params.evaluate.seed"]) == ["1234", "1234", "1234", "1234", "1234", "7"]
    assert runs["tags.pipeline_state"].nunique() == 6
    assert not list((workdir / ".dvc" / "tmp").rglob("mlflow.db"))
    assert set(runs["tags.dvc_exp_name"]) - {"workspace"}  # the exp runs carry their experiment names
    assert runs["tags.git_commit"].str.len().eq(40).all()
    client = mlflow.MlflowClient()
    for run_id, rounds in zip(runs["run_id"], runs["tags.rounds"]):
        steps = list(range(len(rounds.split(",")) + 1))  # 0 = sft, then each round
        assert sorted(m.step for m in client.get_metric_history(run_id, "eval.reward")) == steps
        assert sorted(m.step for m in client.get_metric_history(run_id, "optimize.policy_loss")) == steps[1:]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"eval.jsonl", "eval_by_round.csv", "reward_vs_round.png"} <= artifacts


def test_editing_a_module_reruns_exactly_the_stages_that_run_it(pipeline):
    """Each stage depends on the fingerprint of the code it runs (fingerprints/code/<stage>.json), not on a
    hand-kept module list: an edit to rlhf_core/rl/advantages.py re-runs the stages that import it, in every round,
    and their unchanged outputs stop the re-run there."""
    _, outputs = pipeline
    importers = {stage for stage, files in outputs["code_fingerprints"].items() if "rlhf_core/rl/advantages.py" in files}
    assert {"advantages", "optimize"} <= importers and "prepare" not in importers
    per_round = {"rollout", "score", "advantages", "optimize", "evaluate"}
    expected = {f"{stage}@{key}" for stage in importers & per_round for key in ("r1", "r2", "r3")}
    expected |= importers - per_round - {"train_reward"}
    assert ran_stages(outputs["code_edit"]) == ALWAYS | expected


def test_editing_a_python_scorers_module_rescores(tmp_path):
    """A python scorer's module lies outside dvc.yaml's code deps; the fingerprints stage's fingerprint of it
    (and of what it imports from beside it) makes an edit re-score, and only an edit."""
    import pandas as pd

    workdir = make_reduced_repo(tmp_path / "repo", {"score": {"scorers": [
        {"name": "task", "kind": "task"},
        {"name": "shout", "kind": "python", "function": "my_scorers.shout:score", "weight": 0.0}]}})
    package = workdir / "my_scorers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shout.py").write_text("from my_scorers.rules import BONUS\n\n\ndef score(prompts, responses, metadata):\n"
                                      "    return [BONUS] * len(responses)\n")
    (package / "rules.py").write_text("BONUS = 1.0\n")

    def shout_column() -> set[float]:
        return set(pd.read_parquet(workdir / "scores/r1/scores.parquet")["shout"])

    first = dvc(["repro", "score@r1"], workdir)
    assert {"prepare", "sft", "rollout@r1", "fingerprints", "score@r1"} <= ran_stages(first)
    assert shout_column() == {1.0}
    assert ran_stages(dvc(["repro", "score@r1"], workdir)) == ALWAYS  # nothing edited: the cached scores stand
    (package / "notes.py").write_text("unrelated = True\n")  # not imported by the scorer
    assert ran_stages(dvc(["repro", "score@r1"], workdir)) == ALWAYS
    (package / "rules.py").write_text("BONUS = 2.0\n")  # imported by the scorer's module, not the module itself
    assert ran_stages(dvc(["repro", "score@r1"], workdir)) == ALWAYS | {"score@r1"}
    assert shout_column() == {2.0}


# The 2025–26 names, whose final eval reward must also beat sft's by 0.1 on the default pipeline.
NEW_ALGORITHMS = ("cispo", "sapo", "reinforce_pp")


def switch(workdir: Path, name: str, last_round: str) -> dict:
    """`dvc exp run -S algorithm.name=<name>` alone; the run reached the last checkpoint with that algorithm."""
    output = dvc(["exp", "run", "-S", f"algorithm.name={name}"], workdir)
    assert "optimize@r1" in ran_stages(output), (name, output[-2000:])
    assert json.loads((workdir / f"models/{last_round}/rlhf_state.json").read_text())["algorithm"] == name
    return json.loads((workdir / "metrics/eval.json").read_text())


def test_one_switch_runs_every_registered_algorithm(tmp_path):
    """`dvc exp run -S algorithm.name=<name>` alone runs the pipeline for every registered name (grpo, cispo and
    sapo stopped at the first stage with `kl.reward_coef = 0.05 …` before kl.reward_coef: auto): the new names on
    the repository's own params (3 rounds, the default task), where their eval reward must beat sft's by 0.1; the
    others on the reduced pipeline, to keep CI short."""
    from rlhf_core.rl.algorithms import registry

    default = make_reduced_repo(tmp_path / "default", reduced={})
    dvc(["repro"], default)
    for name in NEW_ALGORITHMS:
        evaluation = switch(default, name, "r3")
        assert evaluation["r3"]["reward"] > evaluation["sft"]["reward"] + 0.1, (name, evaluation)
    reduced = make_reduced_repo(tmp_path / "reduced")
    dvc(["repro"], reduced)
    for name in registry.ALGORITHMS:
        if name not in (*NEW_ALGORITHMS, "ppo"):  # ppo: the default, the repro above
            switch(reduced, name, "r2")
