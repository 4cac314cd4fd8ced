"""Peak memory of one PPO optimize round with a 128k vocabulary: log-probs and entropy over the whole
[tokens, vocab] at once, against in chunks (``models.token_logprobs``, the default).

    python benchmarks/vocab_memory.py [--vocab 128256 --hidden 256 --layers 2] [--out benchmarks/results]

The model is a Llama with Llama 3's vocabulary and tokenizer quirks made locally
(``rlhf_core.tooling.local_models``, untied head, float32).  Each configuration runs in a fresh process: one epoch
of ``train_ppo`` over 16 responses of 32 prompt + 128 response tokens in micro-batches of 8.  It reports the
peak resident memory above what the process held after loading the model, and the log-probs of the first
forward pass, which must agree between the two to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, checkpoint_parameters, machine, write_report
from memory import reset_peak, status_mb

RESPONSES, PROMPT_TOKENS, RESPONSE_TOKENS, MICRO_BATCH = 16, 32, 128, 8
CONFIGS = [("whole [tokens, vocab] at once", 0), ("in chunks (default)", None)]  # (label, chunk_elements)


def worker(args) -> None:
    import torch

    from rlhf_core.config import params_from_dict
    from rlhf_core.model import forward
    from rlhf_core.model.batches import collate
    from rlhf_core.model.checkpoints import load_actor_critic
    from rlhf_core.model.device import seed_everything
    from rlhf_core.rl.algorithms.common import Experience
    from rlhf_core.rl.algorithms.ppo import train_ppo

    if args.chunk_elements is not None:
        forward.LOGPROB_CHUNK_ELEMENTS = args.chunk_elements
    torch.set_num_threads(2)
    params = params_from_dict({"device": "cpu", "optim": {"epochs": 1, "minibatch_size": RESPONSES,
                                                          "micro_batch_size": MICRO_BATCH}, "ppo": {"target_kl": None}})
    seed_everything(0)
    model = load_actor_critic(args.checkpoint, "value_head", torch.device("cpu"))
    vocab = model.policy.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def tokens(count):
        return torch.randint(10, vocab, (RESPONSES, count), generator=generator).tolist()

    prompts, responses = tokens(PROMPT_TOKENS), tokens(RESPONSE_TOKENS)
    with torch.no_grad():
        first = model(collate(prompts[:MICRO_BATCH], responses[:MICRO_BATCH], 0), 1.0, with_values=False).logprobs
    torch.save(first, Path(args.result_dir) / "logprobs.pt")
    zeros = [[0.0] * RESPONSE_TOKENS for _ in range(RESPONSES)]
    advantages = torch.randn(RESPONSES, RESPONSE_TOKENS, generator=generator).tolist()
    experience = Experience(prompts, responses, first.new_full((RESPONSES, RESPONSE_TOKENS), -12.0).tolist(), zeros,
                            zeros, advantages, zeros)
    before = status_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    train_ppo(model, experience, params, temperature=1.0, pad_id=0, device=torch.device("cpu"), seed=0,
              log=lambda *_: None)
    result = {"before_round_mb": round(before, 1), "round_peak_mb": round(status_mb("VmHWM"), 1),
              "seconds": round(time.perf_counter() - started, 2)}
    (Path(args.result_dir) / "result.json").write_text(json.dumps(result))


def run_config(checkpoint: Path, chunk_elements: int | None) -> tuple[dict, object]:
    import torch

    result_dir = Path(tempfile.mkdtemp(prefix="vocab-", dir=checkpoint.parent))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--checkpoint", str(checkpoint),
               "--result-dir", str(result_dir)]
    command += [] if chunk_elements is None else ["--chunk-elements", str(chunk_elements)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_PROGRESS": "off", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads((result_dir / "result.json").read_text()), torch.load(result_dir / "logprobs.pt")


def render(path: Path) -> str:
    from rlhf_core.tooling.docs import markdown_table

    report = json.loads(path.read_text())
    model = report["model"]
    rows = [[c["label"], f"{c['round_peak_mb'] - c['before_round_mb']:.0f}", f"{c['seconds']:.1f}"]
            for c in report["configs"]]
    return "\n".join([
        f"Peak memory of one PPO round above the loaded model: a Llama of {model['parameters'] / 1e6:.0f}M parameters "
        f"(hidden {model['hidden']}, {model['layers']} layers, vocabulary {model['vocab']}, untied head, float32), "
        f"{RESPONSES} responses of {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens, micro-batches of {MICRO_BATCH}; "
        f"{report['machine']}, CPU (`python benchmarks/vocab_memory.py`).", "",
        *markdown_table(["log-probs and entropy", "round peak above the model, MB", "round, s"], rows), "",
        f"Largest difference between the two in the first pass's log-probs: {report['max_abs_logprob_difference']:.1e}."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-elements", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from rlhf_core.tooling.local_models import write_local_model

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_local_model(Path(tmp) / "llama3", "llama3-128k-tiny", vocab_size=args.vocab,
                                       hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=4,
                                       intermediate_size=3 * args.hidden)
        config = json.loads((checkpoint / "config.json").read_text())
        parameters = checkpoint_parameters(checkpoint)
        configs, firsts = [], []
        for label, chunk_elements in CONFIGS:
            result, first = run_config(checkpoint, chunk_elements)
            print(f"{label}: {result}", file=sys.stderr, flush=True)
            configs.append({"label": label, **result})
            firsts.append(first)
    difference = float((firsts[0] - firsts[1]).abs().max())
    if difference > 1e-5:
        sys.exit(f"the chunked log-probs differ from the plain ones by {difference}")
    report = {"machine": machine(), "model": {"parameters": parameters, "hidden": config["hidden_size"],
                                              "layers": config["num_hidden_layers"], "vocab": config["vocab_size"]},
              "configs": configs, "max_abs_logprob_difference": difference}
    write_report(args.out, "vocab_memory", report, render)


if __name__ == "__main__":
    main()
