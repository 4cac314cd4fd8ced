"""Time-to-reward against Hugging Face TRL: the same model, prompts, reward model and settings on both sides.

    python benchmarks/trl_compare.py                      # 3 repetitions of every variant, interleaved (~20 min on 2 cores)
    python benchmarks/trl_compare.py --repeats 1 --variants trl-ppo,ours-ppo
    python benchmarks/trl_compare.py --shape smollm2-135m   # time only, GRPO at real size (~17 min on 2 cores)
    python benchmarks/trl_compare.py --shape smollm2-135m --variants trl-ppo,ours-ppo-rm-critic --add

What is shared (built once, in a copy of this repository with MATCHED's params):
- the policy: the pipeline's own `sft` stage output (models/sft: the tiny from-scratch Llama and its tokenizer);
- the reward: a reward model, `train_reward@rm` with `base: sft` on the built-in sentiment preference pairs, so
  that it reads the policy's tokens (TRL's PPO feeds it the policy's ids).  Both sides train on its score;
- the prompts: prompts/train.parquet to train on, prompts/eval.parquet (held out) to evaluate on.

The variants (VARIANTS): TRL 0.29.1's PPO (`trl.experimental.ppo`; TRL ≥ 1.0 removed PPO), whose value model
starts as a copy of the reward model and whose AdamW lives for the whole run; this pipeline's PPO with a
zero-initialised value head and a fresh AdamW each round (its defaults); the same with each of TRL's two levers
(`algorithm.critic_init` from the reward model, `optim.carry_state`), alone and together; with 4 epochs of
critic warm-up in round 1 (`algorithm.critic_warmup_epochs`); with this pipeline's default linear learning-rate
decay inside each round; and GRPO and RLOO on both sides (the current TRL's).  The settings
both sides share are written once, in MATCHED.

Each repetition runs every variant once, in turn (interleaved), with its own seed: TRL's `seed`, and for the
pipeline the round keys (a1…a10, b1…b10, …), from which every round's seed derives, so prepare, sft and the
reward model stay shared.  After each run the final policy is evaluated by one evaluator (this file, in this
project's environment): `rlhf_core.phases.evaluation.evaluate_checkpoint` on the held-out prompts with a fixed seed,
so both sides' policies answer the same prompts under the same random stream.  It reports the reward model's
score (what was trained on), VADER sentiment (the task the reward model learnt) and the sequence KL to the
start model (Σ_t log π − log π_sft over each sampled response), after the last iteration and after the third
(EARLY: the reward model's score saturates near 6 on this task, so how fast it comes shows what the end does not).

Measured per run: total wall (the TRL process from start to exit; `dvc repro optimize@<last round>` for the
pipeline, its DVC and stage start-ups included), s per iteration (wall / iterations: what a user waits per
round), rollout tokens/s (response tokens generated ÷ seconds inside generate), training tokens/s (response
tokens stepped on ÷ seconds of the update loop: our optimize stages' own measure; TRL's GRPO and RLOO steps less
their generation and scoring, see trl_side.timed_training; not for TRL's PPO), and peak RSS (the TRL process;
the largest round-stage process for the pipeline).

At real size (--shape, a key of rlhf_core.tooling.local_models.SHAPES, e.g. smollm2-135m: 49,152-token vocabulary,
30 blocks, width 576), the policy is a locally built model of that shape with random weights (the Hub is out of
reach here), snapshotted by `sft` (epochs 0); the reward model is trained briefly from it (REAL_SIZE); prompts
are fed as plain text on both sides (chat template off).  Random weights make the rewards meaningless, so
nothing is evaluated: the run measures time per iteration, generation and training tokens/s and peak RSS, over
REAL_SIZE's iterations, GRPO by default.  It writes trl_compare_<shape>.json and .md.

TRL is installed into its own virtualenvs under --venvs (default benchmarks/.venvs), torch first (pinned as
the README installs it), with this project's locked transformers, accelerate, datasets, safetensors and
tokenizers.  TRL runs with 2 torch threads and the AVX2 kernels, as the pipeline's stages do.  Writes
benchmarks/results/trl_compare.json and .md, or trl_compare_<shape>.json and .md (docs/performance.md's table
and the README's time-per-iteration block are generated from them by `python -m rlhf_core.tooling.docs`).  Not a test: nothing passes or fails.  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    checkpoint_parameters,
    copy_repo,
    deep_update,
    dvc_executable,
    machine,
    run,
    stage_startup,
    write_params,
    write_report,
)

from rlhf_core.tooling.docs import render_trl_compare, render_trl_speed

ITERATIONS = 10
EARLY = 3  # the policy is also evaluated after this many iterations: how fast the reward comes, not only where
TRL_VERSIONS = {"ppo": "0.29.1", "grpo": "1.16.0", "rloo": "1.16.0"}  # 0.29.1: the last with PPO; 1.16.0: current
LOCKED = ("transformers", "accelerate", "datasets", "safetensors", "tokenizers")  # TRL's venvs take our versions
MATCHED = {  # one iteration = one round: generate, score, advantages, `epochs` passes of one minibatch
    "prompts_per_iteration": 64,  # PPO: 64 prompts × 1 response
    "max_new_tokens": 32,  # TRL PPO's response_length; generation stops at EOS on both sides
    "temperature": 1.0,
    "epochs": 4,  # TRL: num_ppo_epochs / GRPO's num_iterations; ours: optim.epochs
    "micro_batch_size": 64,  # one forward/backward per minibatch on both sides (the fastest on this model)
    "lr": 1e-4,
    "lr_schedule": "constant",  # over the whole run in TRL; ours: each round (constant either way)
    "adam_eps": 1e-8,  # TRL's default (ours is 1e-5)
    "kl_coef": 0.05,  # PPO: β of the k1 KL penalty in the reward
    "clip_range": 0.2,
    "value_clip_range": 0.2,
    "vf_coef": 0.1,
    "gamma": 1.0,
    "lam": 0.95,
    # No gradient clipping (TRL's PPO never clips; GRPO gets max_grad_norm 0) and no approx-KL early stop
    # (TRL has none).  Advantages whitened over the batch (both); rewards not whitened; no missing-EOS penalty.
    "grpo_prompts_per_iteration": 8,
    "grpo_samples_per_prompt": 8,
    "grpo_kl_loss_coef": 0.05,  # GRPO: β of the k3 KL loss term (TRL's beta; ours kl.loss_coef)
}
EVAL = {"num_prompts": 128, "samples_per_prompt": 2}
REAL_SIZE = {  # --shape other than tiny: what changes against the tiny comparison, to fit 2 cores
    "iterations": 3,  # enough for the time ratio (the first iteration is timed too: both sides start cold)
    "matched": {"epochs": 2},  # 4 would add ~30 s per iteration here; 2 keep the old log-prob pass (1 would not)
    "variants": ("trl-grpo", "ours-grpo"),
    "reward_model": {"num_builtin_pairs": 256, "epochs": 1},  # a few steps: the score only has to exist
}


def base_params(model: Path | None = None) -> dict:
    """Params changes of the shared workspace: MATCHED's PPO as this pipeline spells it, plus the reward model;
    with ``model`` (a real-size local model), its snapshot as the policy and REAL_SIZE's brief reward model."""
    m = MATCHED
    real_size = {} if model is None else {
        "sft": {"model": str(model), "epochs": 0}, "chat": {"template": "off"},
        "reward_models": {"rm": {"base": "sft", **REAL_SIZE["reward_model"]}}}
    return deep_update({
        "reward_models": {"rm": {"base": "sft"}},
        "score": {"scorers": [{"name": "rm", "kind": "hf_classifier", "model": "reward_models/rm"}],
                  "missing_eos_penalty": 0.0},
        "rollout": {"prompts_per_round": m["prompts_per_iteration"], "samples_per_prompt": 1,
                    "max_new_tokens": m["max_new_tokens"], "temperature": m["temperature"],
                    "batch_size": m["prompts_per_iteration"], "forward_batch_size": m["micro_batch_size"]},
        "advantages": {"gamma": m["gamma"], "lam": m["lam"], "whiten_rewards": False, "whiten_advantages": True},
        "kl": {"reward_coef": m["kl_coef"], "reward_estimator": "k1", "adaptive": False, "loss_coef": 0.0},
        "optim": {"epochs": m["epochs"], "minibatch_size": m["prompts_per_iteration"],
                  "micro_batch_size": m["micro_batch_size"], "lr": m["lr"], "lr_schedule": m["lr_schedule"],
                  "warmup_steps": 0, "adam_eps": m["adam_eps"], "weight_decay": 0.0, "max_grad_norm": None,
                  "vf_coef": m["vf_coef"], "ent_coef": 0.0, "loss_aggregation": "token_mean"},
        "ppo": {"clip_range": m["clip_range"], "value_clip_range": m["value_clip_range"], "target_kl": None},
        "evaluate": {**EVAL, "max_new_tokens": m["max_new_tokens"], "temperature": m["temperature"]},
    }, real_size)


OURS_GRPO = {"algorithm": {"name": "grpo"},
             "rollout": {"prompts_per_round": MATCHED["grpo_prompts_per_iteration"],
                         "samples_per_prompt": MATCHED["grpo_samples_per_prompt"]},
             "kl": {"reward_coef": 0.0, "loss_coef": MATCHED["grpo_kl_loss_coef"], "loss_estimator": "k3"},
             "grpo": {"scale_by_std": True}}
OURS_RLOO = {"algorithm": {"name": "rloo"}, "rloo": {"objective": "clipped"},
             "rollout": {"prompts_per_round": MATCHED["grpo_prompts_per_iteration"],
                         "samples_per_prompt": MATCHED["grpo_samples_per_prompt"]}}
VARIANTS = {  # name → ("trl", algorithm) or ("ours", params changes on top of base_params()), in run order
    "trl-ppo": ("trl", "ppo"),
    "ours-ppo": ("ours", {}),
    # The levers TRL's PPO has, alone and together: the critic starts as the reward model; AdamW carried.
    "ours-ppo-rm-critic": ("ours", {"algorithm": {"critic": "separate", "critic_init": "reward_models/rm"}}),
    "ours-ppo-carry": ("ours", {"optim": {"carry_state": True}}),
    "ours-ppo-rm-critic-carry": ("ours", {"algorithm": {"critic": "separate", "critic_init": "reward_models/rm"},
                                          "optim": {"carry_state": True}}),
    "ours-ppo-warmup": ("ours", {"algorithm": {"critic_warmup_epochs": 4}}),  # value-only epochs first, in round 1
    "ours-ppo-linear": ("ours", {"optim": {"lr_schedule": "linear"}}),  # this pipeline's default schedule
    "trl-grpo": ("trl", "grpo"),
    "ours-grpo": ("ours", OURS_GRPO),
    # RLOO, same groups: the sequence's k1 KL (β kl_coef) in the reward, leave-one-out baseline, clipped objective
    # over `epochs`.  Not matched: TRL's ratio is per sequence (exp Σ_t log ρ_t, one clip per response, the mean
    # over responses); ours is per token (token-mean).
    "trl-rloo": ("trl", "rloo"),
    "ours-rloo": ("ours", OURS_RLOO),
}


def locked_versions() -> dict[str, str]:
    lock = (REPO / "requirements.lock").read_text()
    return {name: re.search(rf"^{name}==(\S+)", lock, re.M).group(1) for name in LOCKED}


def trl_python(venvs: Path, version: str) -> Path:
    """The python of a virtualenv with trl==version (created on first use: CPU torch first, then TRL)."""
    python = venvs / f"trl-{version}" / "bin" / "python"
    if python.exists():
        return python
    torch = re.search(r"torch==[0-9.]+", (REPO / "README.md").read_text()).group(0)
    print(f"installing trl=={version} into {python.parents[1]} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, torch], check=True)
    subprocess.run([*pip, torch, f"trl=={version}", *(f"{n}=={v}" for n, v in locked_versions().items())],
                   check=True)
    return python


def prepare_base(base: Path, iterations: int, model: Path | None) -> None:
    """A workspace with MATCHED's params in which prepare, sft and the reward model have run."""
    copy_repo(base, base_params(model))
    rounds = {"rounds": {f"r{i}": {"from": "sft" if i == 1 else f"r{i - 1}"} for i in range(1, iterations + 1)}}
    write_params(base / "params.yaml", base / "params.yaml", lambda raw: deep_update(raw, rounds))
    run([dvc_executable(), "repro", "prepare", "sft", "train_reward@rm"], base)
    run(["git", "add", "-A"], base)
    run(["git", "commit", "-qm", "shared stages"], base)
    from rlhf_core.runtime import stage_times

    stage_times.clear(base)  # each run's peak RSS is then its round stages' alone


def train_prompts(base: Path) -> list[dict]:
    """The train prompts with their token ids as the pipeline encodes them (what TRL's PPO takes)."""
    import pandas as pd

    from rlhf_core.config import load_params
    from rlhf_core.model.chat import encode_prompts
    from rlhf_core.model.loading import load_tokenizer

    params = load_params(base / "params.yaml")
    prompts = pd.read_parquet(base / "prompts/train.parquet")["prompt"].tolist()
    ids = encode_prompts(load_tokenizer(str(base / "models/sft")), prompts, chat=params.chat)
    return [{"prompt": p, "input_ids": i} for p, i in zip(prompts, ids, strict=True)]


def run_trl(algorithm: str, python: Path, base: Path, out: Path, seed: int, prompts: list[dict], iterations: int,
            early: int | None) -> dict:
    out.mkdir(parents=True)
    settings = out / "run.json"
    settings.write_text(json.dumps({"model": str(base / "models/sft"), "reward_model": str(base / "reward_models/rm"),
                                    "prompts": prompts, "seed": seed, "iterations": iterations,
                                    "save_after": [early] if early else [],
                                    "settings": MATCHED}))
    # 2 torch threads and the AVX2 kernels, as the pipeline's stages run (cpu_threads: 2, cpu_isa: avx2)
    from rlhf_core.runtime.launch import PINNED_CPU_ISA, cpu_has_avx2

    environment = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "2",
                   **(PINNED_CPU_ISA if cpu_has_avx2() else {})}
    started = time.perf_counter()
    result = subprocess.run([str(python), str(REPO / "benchmarks/trl_side.py"), algorithm, "--settings", str(settings),
                             "--out", str(out)], env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"TRL {algorithm} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    result = {"wall_seconds": wall, "train_seconds": stats["train_seconds"],
              "generation_tokens_per_s": stats["generation_tokens"] / stats["generation_seconds"],
              "peak_rss_mb": stats["peak_rss_mb"], "version": stats["trl"], "policy": out / "policy",
              "early_policy": out / f"policy-{early}"}
    if stats.get("training_seconds"):  # GRPO and RLOO (trl_side.timed_training)
        result["training_tokens_per_s"] = stats["training_tokens"] / stats["training_seconds"]
    return result


def run_ours(changes: dict, base: Path, out: Path, repetition: int, iterations: int, early: int | None) -> dict:
    from rlhf_core.config import load_params
    from rlhf_core.runtime.stage_times import read_measures

    shutil.copytree(base, out, symlinks=True)
    letter = "abcdefghijklmnopqrstuvwxyz"[repetition]
    keys = [f"{letter}{i}" for i in range(1, iterations + 1)]
    rounds = {key: {"from": "sft" if i == 0 else keys[i - 1]} for i, key in enumerate(keys)}

    def edit(raw: dict) -> None:
        deep_update(raw, changes)
        raw["rounds"] = rounds

    write_params(out / "params.yaml", out / "params.yaml", edit)
    output, wall = run([dvc_executable(), "repro", f"optimize@{keys[-1]}"], out)
    measures = read_measures(out)
    split = stage_startup(output)  # {stage: (start-up s, work s)}
    epochs = load_params(out / "params.yaml").optim.epochs
    tokens = seconds = training_seconds = 0.0
    for key in keys:  # the rates are per stage; the amounts are the rollout's response tokens (× epochs stepped on)
        rollout = json.loads((out / f"metrics/{key}/rollout.json").read_text())
        generated = rollout["response_length_mean"] * rollout["responses"]
        tokens += generated
        seconds += generated / measures[f"rollout@{key}"]["generation_tokens_per_s"]
        training_seconds += generated * epochs / measures[f"optimize@{key}"]["training_tokens_per_s"]
    return {"wall_seconds": wall, "generation_tokens_per_s": tokens / seconds,
            "training_tokens_per_s": tokens * epochs / training_seconds,
            "stage_work_seconds": sum(work for _, work in split.values()),
            "stage_startup_seconds": sum(startup for startup, _ in split.values()),
            "peak_rss_mb": max(m.get("peak_rss_mb", 0.0) for m in measures.values()), "policy": out / "models" / keys[-1],
            "early_policy": out / "models" / keys[(early or 1) - 1]}


class Evaluator:
    """One evaluation for every policy: the pipeline's evaluate_checkpoint, on the shared held-out prompts."""

    def __init__(self, base: Path):
        import pandas as pd

        from rlhf_core.config import ScorerParams, load_params, replace
        from rlhf_core.model.device import resolve_device
        from rlhf_core.model.loading import checkpoint_stop_ids, load_causal_lm, load_tokenizer

        params = load_params(base / "params.yaml")
        vader = ScorerParams(name="vader", kind="vader", weight=0.0)  # monitored: the task the reward model learnt
        self.params = replace(params, score=replace(params.score, scorers=(*params.score.scorers, vader)))
        self.base = base
        self.device = resolve_device("cpu", params.cpu_threads)
        self.tokenizer = load_tokenizer(str(base / "models/sft"))
        self.reference = load_causal_lm(str(base / "models/sft"), self.device)
        self.stop_ids = checkpoint_stop_ids(base / "models/sft", self.tokenizer)
        self.prompts = pd.read_parquet(base / "prompts/eval.parquet")["prompt"].tolist()[: EVAL["num_prompts"]]
        self._load = load_causal_lm

    def __call__(self, policy_dir: Path | None) -> dict:
        from rlhf_core.phases.evaluation import evaluate_checkpoint

        policy = self.reference if policy_dir is None else self._load(str(policy_dir), self.device)
        cwd = os.getcwd()
        os.chdir(self.base)  # the scorer's reward model path is relative to the workspace
        try:
            metrics, _ = evaluate_checkpoint(policy, self.reference, self.tokenizer, self.prompts, None, self.params,
                                             self.device, stop_ids=self.stop_ids)
        finally:
            os.chdir(cwd)
        return {"reward_rm": metrics["reward_rm"], "vader": metrics["reward_vader"], "kl": metrics["kl"],
                "length": metrics["length"]}


def main() -> None:
    from rlhf_core.tooling.local_models import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=("tiny", *SHAPES),
                        help="tiny: the pipeline's from-scratch model, 10 iterations, evaluated; otherwise a local "
                             "model of that shape, REAL_SIZE's iterations, time only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all for tiny, "
                                           f"{','.join(REAL_SIZE['variants'])} otherwise)")
    parser.add_argument("--venvs", type=Path, default=REPO / "benchmarks" / ".venvs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--add", action="store_true",
                        help="add these variants' runs to the existing report of this shape (same machine and matched "
                             "settings; each variant keeps the runs it was interleaved with, and its command)")
    args = parser.parse_args()
    tiny = args.shape == "tiny"
    name = "trl_compare" if tiny else f"trl_compare_{args.shape}"
    variants = (args.variants or ",".join(VARIANTS if tiny else REAL_SIZE["variants"])).split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        sys.exit(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    iterations, early = (ITERATIONS, EARLY) if tiny else (REAL_SIZE["iterations"], None)
    if not tiny:
        MATCHED.update(REAL_SIZE["matched"])
    pythons = {v: trl_python(args.venvs, TRL_VERSIONS[VARIANTS[v][1]]) for v in variants if VARIANTS[v][0] == "trl"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-trl-") as tmp:
        work = Path(tmp)
        model = None
        if not tiny:
            from rlhf_core.tooling.local_models import write_local_model

            model = write_local_model(work / "model", args.shape)
            parameters = checkpoint_parameters(model)
        base = work / "base"
        base.mkdir()
        prepare_base(base, iterations, model)
        prompts = train_prompts(base)
        evaluator = Evaluator(base) if tiny else None
        start = evaluator(None) if evaluator else None
        if evaluator:
            print(f"start model: {start}", flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for repetition in range(args.repeats):
            for variant in variants:
                side, what = VARIANTS[variant]
                out = work / f"{variant}-{repetition}"
                if side == "trl":
                    result = run_trl(what, pythons[variant], base, out, repetition, prompts, iterations, early)
                else:
                    result = run_ours(what, base, out, repetition, iterations, early)
                policy, early_policy = result.pop("policy"), result.pop("early_policy")
                if evaluator:
                    result.update(evaluator(policy))
                    result.update({f"{key}_at_{early}": value for key, value in evaluator(early_policy).items()})
                result["seconds_per_iteration"] = result["wall_seconds"] / iterations
                print(f"{variant} #{repetition}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in result.items()), flush=True)
                runs[variant].append(result)
                shutil.rmtree(out)
    report = {
        "machine": machine(), "command": " ".join(["python benchmarks/trl_compare.py", *sys.argv[1:]]),
        "shape": args.shape, "iterations": iterations, "early": early, "repeats": args.repeats, "matched": MATCHED,
        **({"eval": {**EVAL, "num_prompts": len(evaluator.prompts)},  # all of prompts/eval.parquet when fewer
            "start": start} if evaluator else {"parameters": parameters}),
        "trl_versions": {VARIANTS[v][1]: runs[v][0]["version"] for v in variants if VARIANTS[v][0] == "trl"},
        "total_seconds": round(time.perf_counter() - started),
        "variants": {v: {key: summarise([r[key] for r in runs[v]]) for key in runs[v][0] if key != "version"}
                     for v in variants},
        "runs": {v: [{k: value for k, value in r.items() if k != "version"} for r in runs[v]] for v in variants},
    }
    if args.add:
        report = add_to_report(json.loads((args.out / f"{name}.json").read_text()), report)
    write_report(args.out, name, report,
                 render_trl_compare if tiny else render_trl_speed)


def add_to_report(existing: dict, new: dict) -> dict:
    """``existing`` with ``new``'s variants (and TRL versions) added; the settings must be the same."""
    for key in ("machine", "shape", "iterations", "repeats", "matched"):
        if existing.get(key, "tiny" if key == "shape" else None) != new.get(key):  # older tiny reports: no shape
            sys.exit(f"--add: {key} differs from the existing report's ({existing.get(key)!r} vs {new.get(key)!r}); "
                     "run all variants again instead")
    commands = existing.get("commands") or {v: existing["command"] for v in existing["variants"]}
    return {**existing, "commands": {**commands, **{v: new["command"] for v in new["variants"]}},
            "trl_versions": {**existing["trl_versions"], **new["trl_versions"]},
            "total_seconds": existing["total_seconds"] + new["total_seconds"],
            "variants": {**existing["variants"], **new["variants"]}, "runs": {**existing["runs"], **new["runs"]}}


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


if __name__ == "__main__":
    main()
