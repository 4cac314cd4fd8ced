"""Where the time of a round goes: stage start-up, generation, updates, memory and the round's split.

    python benchmarks/perf.py                       # the default tiny model (about 10 min on 2 CPU cores)
    python benchmarks/perf.py --size small --only rollout,optimize,round   # 7× the parameters: 256 wide, 6 blocks
    python benchmarks/perf.py --only startup,round  # some sections only

Copies the repository (default params, plus the size's model shape) into a temporary directory, runs
`dvc repro` there once so every stage has its inputs, then measures, repeating each measurement
``--repeats`` times and reporting the median with the min–max spread:

startup   each stage's start-up (process start → inputs and models loaded, as the stage logs it), cold
          (``RLHF_WARM_START=0``: a fresh interpreter imports everything) and warm (forked by the
          warm-start server, rlhf_core/runtime/warm.py), next to the floor: a bare interpreter importing only
          the libraries that stage truly needs.  Target: cold ≤ 1.25 × floor.
rollout   generation tokens/s of rlhf_core.phases.rollout.generate_samples by batch size, against plain HF
          ``generate`` one prompt at a time; and the whole rollout (generation + log-probs + values).
          Target: ≥ 3 × one-at-a-time at the default batch.
optimize  forward + backward tokens/s (prompt + response tokens) of one PPO epoch by micro-batch size.
memory    peak RSS of the rollout and optimize stages (cold processes) as rollout.prompts_per_round grows
          ×1, ×2, ×4 at the default micro-batch.  Target: optimize grows ≤ 10% at ×4.
round     `dvc repro` of one round's four stages, split by stage, and the overhead share: the start-up
          of the round's stages ÷ the round's wall time (cold and warm).  Target: ≤ 25%.

Writes benchmarks/results/perf_<size>.json and .md (the performance block of docs/performance.md is
generated from the JSON by `python -m rlhf_core.tooling.docs`).  Not a test: nothing passes or fails.  Run it on a quiet
machine: another busy process makes every number slower and noisier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, copy_repo, dvc_executable, machine, run, stage_startup, summary, write_params, write_report

SIZES = {
    "tiny": {},  # the default params
    "small": {"sft": {"tiny": {"hidden_size": 256, "num_layers": 6, "num_heads": 8, "intermediate_size": 1024},
                      "epochs": 1}},
}
SECTIONS = ("startup", "rollout", "optimize", "memory", "round")
STAGES = {  # stage → (command arguments, the libraries it truly needs: the floor's imports)
    "prepare": (["stages.prepare"], "import pandas, pyarrow.parquet"),
    "sft": (["stages.sft", "--params", "params.startup.yaml"],
            "import torch, tokenizers, pandas, pyarrow.parquet, transformers.models.llama.modeling_llama; "
            "from transformers import PreTrainedTokenizerFast"),
    "rollout": (["stages.rollout", "--round", "r1"],
                "import torch, pandas, pyarrow.parquet, safetensors.torch, transformers.models.llama.modeling_llama; "
                "from transformers import PreTrainedTokenizerFast"),
    "score": (["stages.score", "--round", "r1"], "import pandas, pyarrow.parquet, vaderSentiment.vaderSentiment"),
    "advantages": (["stages.advantages", "--round", "r1"], "import torch, pandas, pyarrow.parquet"),
    "optimize": (["stages.optimize", "--round", "r1"],
                 "import torch, pandas, pyarrow.parquet, safetensors.torch, transformers.models.llama.modeling_llama; "
                 "from transformers import PreTrainedTokenizerFast"),
    "evaluate": (["stages.evaluate", "--checkpoint", "r1"],
                 "import torch, pandas, pyarrow.parquet, safetensors.torch, vaderSentiment.vaderSentiment, "
                 "transformers.models.llama.modeling_llama; from transformers import PreTrainedTokenizerFast"),
    "track": (["stages.track"], "import mlflow, pandas"),
}
ROUND_STAGES = ("rollout", "score", "advantages", "optimize")
STAGE_NAMES = {stage: f"{stage}@r1" if "--round" in arguments else stage for stage, (arguments, _) in STAGES.items()}


def env(warm: bool) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "RLHF_STAGE"))}
    environment["RLHF_WARM_START"] = "1" if warm else "0"
    return environment


def stage_command(stage: str, params_file: str | None = None) -> list[str]:
    """The stage's command as dvc.yaml runs it, with another params file if given."""
    extra = ["--params", params_file] if params_file else []
    return [sys.executable, "-m", "rlhf_core.runtime.launch", *STAGES[stage][0], *extra]


def run_stage(work: Path, stage: str, *, warm: bool, params_file: str | None = None) -> tuple[float, float]:
    """One stage as DVC runs it; (start-up seconds the stage logged, wall seconds of its process)."""
    started = time.perf_counter()
    result = subprocess.run(stage_command(stage, params_file), cwd=work, env=env(warm), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{stage} failed:\n{result.stderr[-3000:]}")
    return stage_startup(result.stderr)[STAGE_NAMES[stage]][0], wall


def floor_seconds(imports: str) -> float:
    """A bare interpreter importing ``imports``: seconds from its process start to the end of the imports,
    on the same clock as the stages' start-up (not counting the interpreter's exit)."""
    code = (f"{imports}\nimport time\nfrom rlhf_core.runtime.stage_times import process_started\n"
            "print(time.time() - process_started())")
    result = subprocess.run([sys.executable, "-c", code], check=True, env=env(False), cwd=REPO, capture_output=True,
                            text=True)
    return float(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------


def bench_startup(work: Path, repeats: int) -> dict:
    # sft's start-up (tokenizer trained, model built) does not depend on its epochs: time it with one
    # (a from-scratch model needs at least one), last, then restore every output from DVC's cache.
    write_params(work / "params.yaml", work / "params.startup.yaml", lambda raw: raw["sft"].update(epochs=1))
    results = {}
    for stage, (_, imports) in sorted(STAGES.items(), key=lambda item: item[0] == "sft"):
        floors = [floor_seconds(imports) for _ in range(repeats)]
        cold = [run_stage(work, stage, warm=False)[0] for _ in range(repeats)]
        run_stage(work, stage, warm=True)  # the server is up (it stays up between the stages of a repro)
        warm = [run_stage(work, stage, warm=True)[0] for _ in range(repeats)]
        results[stage] = {"floor_imports": imports, "floor_s": summary(floors), "cold_s": summary(cold),
                          "warm_s": summary(warm),
                          "cold_over_floor": round(statistics.median(cold) / statistics.median(floors), 2),
                          "warm_over_floor": round(statistics.median(warm) / statistics.median(floors), 2)}
        print(f"startup {stage}: {results[stage]}", flush=True)
    run([dvc_executable(), "checkout", "-f"], work)  # the one-epoch SFT overwrote models/sft
    return results


def bench_rollout(work: Path, repeats: int, batch_sizes: list[int]) -> dict:
    import torch

    from rlhf_core.config import load_params
    from rlhf_core.model.device import resolve_device
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.rollout import generate_samples, generation_config, record_token_stats, sample_prompt_indices

    params = load_params(work / "params.yaml")
    ro = params.rollout
    device = resolve_device(params.device, params.cpu_threads)
    tokenizer = load_tokenizer(str(work / "models/sft"))
    policy = load_causal_lm(str(work / "models/sft"), device)
    import pandas as pd

    prompts = pd.read_parquet(work / "prompts/train.parquet")["prompt"].tolist()
    chosen = [prompts[i] for i in sample_prompt_indices(len(prompts), ro.prompts_per_round, params.seed)]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chosen]
    sampling = dict(samples_per_prompt=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                    top_k=ro.top_k, max_new_tokens=ro.max_new_tokens, device=device)

    def batched(batch_size: int, seed: int) -> tuple[float, int]:
        started = time.perf_counter()
        samples = generate_samples(policy, tokenizer, prompt_ids, batch_size=batch_size, seed=seed, **sampling)
        return time.perf_counter() - started, sum(len(s.response_ids) for s in samples)

    def one_at_a_time(seed: int, count: int) -> tuple[float, int]:
        """Plain HF generate, one (prompt, sample) at a time: the baseline."""
        config = generation_config(tokenizer, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                   max_new_tokens=ro.max_new_tokens)
        torch.manual_seed(seed)
        tokens, started = 0, time.perf_counter()
        with torch.inference_mode():
            for ids in prompt_ids[:count]:
                for _ in range(ro.samples_per_prompt):
                    output = policy.generate(input_ids=torch.tensor([ids], device=device),
                                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                             generation_config=config)
                    tokens += output.shape[1] - len(ids)
        return time.perf_counter() - started, tokens

    results = {"sequences": len(prompt_ids) * ro.samples_per_prompt, "max_new_tokens": ro.max_new_tokens,
               "default_batch_size": ro.batch_size, "by_batch_size": {}}
    count = max(1, len(prompt_ids) // 4)  # a quarter of the prompts is plenty for the slow baseline
    rates = [tokens / seconds for seconds, tokens in (one_at_a_time(seed, count) for seed in range(repeats))]
    results["one_at_a_time_tokens_per_s"] = summary(rates, 1)
    for batch_size in batch_sizes:
        rates = [tokens / seconds for seconds, tokens in (batched(batch_size, seed) for seed in range(repeats))]
        results["by_batch_size"][str(batch_size)] = summary(rates, 1)
        print(f"rollout batch {batch_size}: {results['by_batch_size'][str(batch_size)]}", flush=True)
    default = results["by_batch_size"].get(str(ro.batch_size))
    if default:
        results["speedup_at_default_batch"] = round(default["median"] / results["one_at_a_time_tokens_per_s"]["median"], 1)
    # The whole in-process rollout: generation, then log-probs and values (round 1: π_ref = the policy).
    from rlhf_core.model.checkpoints import load_actor_critic

    actor_critic = load_actor_critic(str(work / "models/sft"), params.algorithm.critic, device)
    walls = []
    for seed in range(repeats):
        started = time.perf_counter()
        samples = generate_samples(actor_critic.policy, tokenizer, prompt_ids, batch_size=ro.batch_size, seed=seed,
                                   **sampling)
        record_token_stats(actor_critic, None, samples, pad_id=tokenizer.pad_token_id, temperature=ro.temperature,
                           batch_size=ro.forward_batch_size, device=device, reference_is_policy=True)
        walls.append(time.perf_counter() - started)
    results["generate_and_record_s"] = summary(walls)
    return results


def bench_optimize(work: Path, repeats: int, micro_sizes: list[int]) -> dict:
    import pandas as pd

    from rlhf_core.config import load_params, replace
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.model.device import resolve_device
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.rl.algorithms.common import Experience
    from rlhf_core.rl.algorithms.train import train_round

    params = load_params(work / "params.yaml")
    device = resolve_device(params.device, params.cpu_threads)
    rollouts = pd.read_parquet(work / "rollouts/r1/rollouts.parquet")
    advantages = pd.read_parquet(work / "advantages/r1/advantages.parquet")
    experience = Experience(rollouts["prompt_ids"].tolist(), rollouts["response_ids"].tolist(),
                            rollouts["logprobs"].tolist(), rollouts["ref_logprobs"].tolist(),
                            rollouts["values"].tolist(), advantages["advantages"].tolist(),
                            advantages["returns"].tolist())
    tokens = int(sum(len(p) + len(r) for p, r in zip(experience.prompt_ids, experience.response_ids)))
    tokenizer = load_tokenizer(str(work / "models/sft"))
    train = train_round
    results = {"sequences": len(experience), "tokens_per_epoch": tokens, "minibatch_size": params.optim.minibatch_size,
               "default_micro_batch_size": params.optim.micro_batch_size, "by_micro_batch_size": {}}
    for micro in micro_sizes:
        one_epoch = replace(params, optim=replace(params.optim, epochs=1, micro_batch_size=micro,
                                                  minibatch_size=max(micro, params.optim.minibatch_size)),
                            ppo=replace(params.ppo, target_kl=None))
        rates = []
        for seed in range(repeats):
            model = load_actor_critic(str(work / "models/sft"), params.algorithm.critic, device)
            started = time.perf_counter()
            train(model, experience, one_epoch, temperature=params.rollout.temperature,
                  pad_id=tokenizer.pad_token_id, device=device, seed=seed, log=lambda *_: None)
            rates.append(tokens / (time.perf_counter() - started))
        results["by_micro_batch_size"][str(micro)] = summary(rates, 1)
        print(f"optimize micro {micro}: {results['by_micro_batch_size'][str(micro)]}", flush=True)
    return results


def peak_rss_mb(work: Path, stage: str, params_file: str) -> float:
    """Peak resident memory of one cold stage process: VmHWM of /proc/<pid>/status, read every 20 ms.

    Not getrusage/wait4: Linux carries ru_maxrss over fork and exec, so a child of this (large)
    benchmark process would report this process's peak."""
    process = subprocess.Popen(stage_command(stage, params_file), cwd=work, env=env(False),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_kb = 0
    while process.poll() is None:
        with contextlib.suppress(OSError, AttributeError):  # the process may end between poll and read
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kb = max(peak_kb, int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)))
        time.sleep(0.02)
    if process.returncode != 0:
        sys.exit(f"{stage} failed with exit code {process.returncode}")
    return peak_kb / 1024


def bench_memory(work: Path, repeats: int, factors: list[int]) -> dict:
    from rlhf_core.config import load_params

    params = load_params(work / "params.yaml")
    base = params.rollout.prompts_per_round
    results = {"micro_batch_size": params.optim.micro_batch_size, "by_prompts_per_round": {}}
    for factor in factors:
        name = f"params.memory{factor}.yaml"
        write_params(work / "params.yaml", work / name,
                     lambda raw, count=base * factor: raw["rollout"].update(prompts_per_round=count))
        rollout_mb, optimize_mb = [], []
        for _ in range(repeats):
            rollout_mb.append(peak_rss_mb(work, "rollout", name))
            for stage in ("score", "advantages"):
                run_stage(work, stage, warm=True, params_file=name)
            optimize_mb.append(peak_rss_mb(work, "optimize", name))
        results["by_prompts_per_round"][str(base * factor)] = {"rollout_mb": summary(rollout_mb, 1),
                                                              "optimize_mb": summary(optimize_mb, 1)}
        print(f"memory ×{factor}: {results['by_prompts_per_round'][str(base * factor)]}", flush=True)
    first, last = results["by_prompts_per_round"][str(base)], results["by_prompts_per_round"][str(base * factors[-1])]
    for stage in ("rollout", "optimize"):
        growth = last[f"{stage}_mb"]["median"] / first[f"{stage}_mb"]["median"] - 1
        results[f"{stage}_growth_at_x{factors[-1]}"] = round(growth, 3)
    run([dvc_executable(), "checkout", "-f"], work)  # back to the default round's outputs
    return results


def bench_round(work: Path, repeats: int) -> dict:
    """`dvc repro -f` of round 1's four stages; start-up from the stages' own lines."""
    results = {}
    for mode, warm in (("cold", False), ("warm", True)):
        walls, startups, splits = [], [], []
        if warm:
            run_stage(work, "score", warm=True)  # the server is up, as after the first stage of a repro
        for _ in range(repeats):
            started = time.perf_counter()
            result = subprocess.run([dvc_executable(), "repro", "-f", "--single-item",
                                     *[f"{stage}@r1" for stage in ROUND_STAGES]], cwd=work, env=env(warm),
                                    capture_output=True, text=True)
            walls.append(time.perf_counter() - started)
            if result.returncode != 0:
                sys.exit(f"dvc repro failed:\n{(result.stdout + result.stderr)[-3000:]}")
            output = result.stdout + result.stderr
            timings = stage_startup(output)  # {stage: (start-up, work)}
            startups.append(sum(timings[f"{stage}@r1"][0] for stage in ROUND_STAGES))
            splits.append({stage: {"startup_s": timings[f"{stage}@r1"][0], "work_s": timings[f"{stage}@r1"][1]}
                           for stage in ROUND_STAGES})
        median_index = sorted(range(repeats), key=lambda i: walls[i])[repeats // 2]
        results[mode] = {"wall_s": summary(walls, 2), "startup_s": summary(startups, 2),
                         "overhead_share": round(statistics.median(startups) / statistics.median(walls), 3),
                         "split_of_median_run": splits[median_index]}
        print(f"round {mode}: {results[mode]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        sys.exit(f"--only: unknown sections {unknown}; allowed: {', '.join(SECTIONS)}")
    report = {"machine": machine(), "size": args.size, "params_changes": SIZES[args.size], "repeats": args.repeats,
              "command": f"python benchmarks/perf.py --size {args.size} --repeats {args.repeats}"}
    previous = args.out / f"perf_{args.size}.json"
    if set(sections) != set(SECTIONS):
        report["command"] += f" --only {','.join(sections)}"
        if previous.is_file():  # keep the other sections, measured before
            earlier = json.loads(previous.read_text())
            report = {**earlier, **report, "command": f"{earlier['command']}; then {report['command']}"}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-perf-") as tmp:
        work = Path(tmp)
        copy_repo(work, SIZES[args.size])
        _, seconds = run([dvc_executable(), "repro"], work)
        report["setup_repro_s"] = round(seconds, 1)
        if "startup" in sections:
            report["startup"] = bench_startup(work, args.repeats)
        if "rollout" in sections:
            report["rollout"] = bench_rollout(work, args.repeats, [1, 8, 32, 128, 256])
        if "optimize" in sections:
            report["optimize"] = bench_optimize(work, args.repeats, [1, 4, 16, 64])
        if "memory" in sections:
            report["memory"] = bench_memory(work, max(1, args.repeats - 1), [1, 2, 4])
        if "round" in sections:
            report["round"] = bench_round(work, args.repeats)
    from rlhf_core.tooling.docs import perf_tables

    write_report(args.out, f"perf_{args.size}", report, lambda path: "\n".join(perf_tables(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
