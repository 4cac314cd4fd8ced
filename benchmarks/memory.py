"""Peak memory of one PPO optimize round per process, by memory lever, for a Llama-shaped model made locally.

    python benchmarks/memory.py [--hidden 512 --layers 8 --vocab 32000] [--out benchmarks/results]

Configurations: float32 weights; bfloat16 weights (compute.param_dtype); bfloat16 + gradient checkpointing
(compute.gradient_checkpointing); FSDP2 with 2 processes (compute.strategy: fsdp, gloo on CPU), float32 and
bfloat16 + checkpointing; DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes (compute.strategy: deepspeed), float32.
Each runs in fresh processes (the 2-process ones under `accelerate launch`, as the pipeline runs them): the model
is loaded with ``load_actor_critic`` on ``Runtime.load_device`` (fsdp: rank 1 builds it on the meta device and
gets its shards from rank 0), then ``train_ppo`` makes one epoch over
16 responses of 128 prompt + 128 response tokens in micro-batches of 4.  Per process it reports, above the
resident memory after the imports, the peak while loading the model and the peak during the round
(VmHWM, reset between the two), and the parameter bytes the process holds.  CPU only here; on a GPU the same levers act on
device memory, which this script does not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, write_report

CONFIGS = [  # (label, processes, strategy, param_dtype, gradient_checkpointing)
    ("float32", 1, "ddp", "float32", False),
    ("bfloat16", 1, "ddp", "bfloat16", False),
    ("bfloat16 + gradient checkpointing", 1, "ddp", "bfloat16", True),
    ("FSDP2, 2 processes, float32", 2, "fsdp", "float32", False),
    ("FSDP2, 2 processes, bfloat16 + checkpointing", 2, "fsdp", "bfloat16", True),
    ("DeepSpeed ZeRO-2, 2 processes, float32", 2, "zero2", "float32", False),
    ("DeepSpeed ZeRO-3, 2 processes, float32", 2, "zero3", "float32", False),
]
RESPONSES, PROMPT_TOKENS, RESPONSE_TOKENS, MICRO_BATCH = 16, 128, 128, 4


def status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def reset_peak() -> None:
    """Start VmHWM (the peak resident memory) again from the current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_checkpoint(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    """A randomly initialised Llama (float32, untied head) saved with save_pretrained; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=3 * hidden, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """One configuration in this process (one rank under accelerate launch): print one JSON line per rank."""
    import torch

    from rlhf_core.config import params_from_dict
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.model.device import seed_everything
    from rlhf_core.model.loading import enable_gradient_checkpointing
    from rlhf_core.rl.algorithms.common import Experience
    from rlhf_core.rl.algorithms.ppo import train_ppo
    from rlhf_core.runtime.distributed import start_runtime

    after_imports = status_mb("VmRSS")
    params = params_from_dict({
        "device": "cpu", "cpu_threads": 1,
        "compute": {"num_processes": args.processes, "param_dtype": args.param_dtype,
                    "gradient_checkpointing": args.checkpointing,
                    **({"strategy": "deepspeed", "zero_stage": int(args.strategy[-1])}
                       if args.strategy.startswith("zero") else {"strategy": args.strategy})},
        "optim": {"epochs": 1, "minibatch_size": RESPONSES, "micro_batch_size": MICRO_BATCH},
        "ppo": {"target_kl": None}})
    seed_everything(0)
    runtime = start_runtime(params)
    model = load_actor_critic(args.checkpoint, "value_head", runtime.load_device, param_dtype=args.param_dtype)
    if args.checkpointing:
        enable_gradient_checkpointing(model)
    load_peak = status_mb("VmHWM")
    generator = torch.Generator().manual_seed(0)
    vocab = model.policy.config.vocab_size

    def tokens(count):
        return torch.randint(2, vocab, (RESPONSES, count), generator=generator).tolist()

    zeros = [[0.0] * RESPONSE_TOKENS for _ in range(RESPONSES)]
    advantages = torch.randn(RESPONSES, RESPONSE_TOKENS, generator=generator).tolist()
    experience = Experience(tokens(PROMPT_TOKENS), tokens(RESPONSE_TOKENS), [[-10.0] * RESPONSE_TOKENS] * RESPONSES,
                            zeros, zeros, advantages, zeros)
    before_round = status_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    metrics = train_ppo(model, experience, params, temperature=1.0, pad_id=0, device=runtime.device, seed=0,
                        log=lambda *_: None)
    seconds = time.perf_counter() - started
    result = {"rank": runtime.rank, "after_imports_mb": round(after_imports, 1), "load_peak_mb": round(load_peak, 1),
              "before_round_mb": round(before_round, 1), "round_peak_mb": round(status_mb("VmHWM"), 1),
              "seconds": round(seconds, 2), "parameter_mb": round(metrics["parameter_bytes_per_process"] / 2**20, 1),
              "steps": metrics["optimizer_steps"]}
    Path(args.result_dir, f"rank{runtime.rank}.json").write_text(json.dumps(result))
    runtime.close()


def run_config(checkpoint: Path, processes: int, strategy: str, param_dtype: str, checkpointing: bool) -> list[dict]:
    result_dir = Path(tempfile.mkdtemp(prefix="memory-", dir=checkpoint.parent))
    script = [str(Path(__file__).resolve()), "--worker", "--checkpoint", str(checkpoint), "--processes",
              str(processes), "--strategy", strategy, "--param-dtype", param_dtype, "--result-dir", str(result_dir)]
    script += ["--checkpointing"] if checkpointing else []
    if processes == 1:
        command = [sys.executable, *script]
    else:
        from rlhf_core.runtime.launch import accelerate_config, free_port

        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(accelerate_config("deepspeed" if strategy.startswith("zero") else strategy)),
                   "--num_processes", str(processes),
                   "--mixed_precision", "no", "--main_process_port", str(free_port()), *script]
    # glibc raises its mmap threshold after large frees and then keeps freed tensors in the heap, so the
    # resident memory would show what the allocator cached, not what torch holds: a fixed threshold returns
    # every tensor above 64 KiB to the system when torch frees it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_PROGRESS": "off", "MASTER_ADDR": "127.0.0.1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    from rlhf_core.tooling.docs import markdown_table

    rows = []
    for config in report["configs"]:
        ranks = config["ranks"]
        rows.append([config["label"], f"{max(r['parameter_mb'] for r in ranks):.0f}",
                     " / ".join(f"{r['load_peak_mb'] - r['after_imports_mb']:.0f}" for r in ranks),
                     f"{max(r['round_peak_mb'] - r['after_imports_mb'] for r in ranks):.0f}",
                     f"{max(r['seconds'] for r in ranks):.1f}"])
    model = report["model"]
    lines = [f"Peak memory of one PPO optimize round per process: a Llama of {model['parameters'] / 1e6:.0f}M "
             f"parameters (hidden {model['hidden']}, {model['layers']} layers, vocabulary {model['vocab']}, untied "
             f"head), {RESPONSES} responses of {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens, micro-batches of "
             f"{MICRO_BATCH}; {report['machine']}, CPU (`python benchmarks/memory.py`).", "",
             *markdown_table(["configuration", "parameters held, MB", "loading peak, MB (rank 0 / 1)",
                              "round peak, MB", "round, s"], rows), "",
             "Resident memory above what the process held after its imports (torch and transformers alone hold "
             "about 220 MB): the peak while loading the model (each process), and the peak during the PPO round "
             "(weights, gradients, AdamW state and activations; the larger of the two processes). Under FSDP2 only "
             "rank 0 reads the checkpoint: rank 1 builds the model on the meta device and receives its shards. "
             "ZeRO-2 keeps whole weights in every process and partitions gradients and AdamW's state (with a float32 "
             "copy of its partition of the weights); ZeRO-3 partitions the weights too."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--param-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama"
        parameters = make_checkpoint(checkpoint, args.hidden, args.layers, args.vocab)
        configs = []
        for label, processes, strategy, param_dtype, checkpointing in CONFIGS:
            ranks = run_config(checkpoint, processes, strategy, param_dtype, checkpointing)
            print(f"{label}: {ranks}", file=sys.stderr, flush=True)
            configs.append({"label": label, "processes": processes, "strategy": strategy, "param_dtype": param_dtype,
                            "gradient_checkpointing": checkpointing, "ranks": ranks})
    report = {"machine": machine(), "model": {"parameters": parameters, "hidden": args.hidden, "layers": args.layers,
                                              "vocab": args.vocab}, "configs": configs}
    write_report(args.out, "memory", report, render)


if __name__ == "__main__":
    main()
