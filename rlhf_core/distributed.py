"""One stage, one or several processes: the runtime that rollout and optimize run under.

``compute.num_processes: 1`` (the default) runs a stage in process as plain python: ``start_runtime``
returns a single-process runtime whose every method is the identity, and nothing of accelerate is
imported.  With more processes, ``python -m rlhf_core.launch`` starts the stage under
``accelerate launch`` (torchrun underneath), and ``start_runtime`` joins the process group through
``accelerate.Accelerator``: NCCL on GPUs, gloo on CPU.  Then

- rollout gives whole generation batches to ranks round-robin (each batch seeded as in one process),
  gathers the samples and the per-token stats, and rank 0 alone writes the one Parquet file;
- optimize gives every rank every W-th micro-batch of each minibatch; the model is wrapped by
  accelerate (DDP, FSDP or DeepSpeed, from configs/accelerate/<strategy>.yaml), the losses, already
  normalised by the whole minibatch's token count, are scaled by W so that DDP's gradient mean is a
  sum, and the stats are combined in the global micro-batch order, so every rank takes the same
  early-stop decision.  Rank 0 writes the checkpoint.

``compute.mixed_precision`` (bf16 / fp16) also goes through the Accelerator (autocast, and the loss
scaler of fp16), in one process as in several.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_core.errors import ConfigError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def accelerate_config(strategy: str) -> Path:
    """The accelerate config file shipped for a strategy: configs/accelerate/<strategy>.yaml."""
    return ACCELERATE_CONFIGS / f"{strategy}.yaml"


def check_compute(compute, device_type: str) -> None:
    """Checks of the compute params that need the resolved device (``device: auto`` may be a CPU)."""
    if device_type == "cpu" and compute.mixed_precision == "fp16":
        raise ConfigError("compute.mixed_precision = 'fp16': not supported on CPU (the device resolved to cpu); "
                          "must be 'no' or 'bf16' on CPU")
    if device_type == "cpu" and compute.num_processes > 1 and compute.strategy != "ddp":
        raise ConfigError(f"compute.strategy = {compute.strategy!r}: needs GPUs; on CPU (the device resolved to cpu) "
                          "it must be 'ddp'")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when not launched by them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class Runtime:
    """Rank, world size, device and the accelerate object of one stage process (None: plain python)."""

    device: Any
    rank: int = 0
    world_size: int = 1
    accelerator: Any = None
    strategy: str = "ddp"
    _prepared: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- work sharing -------------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's share of ``items``: every world_size-th item, starting at its rank."""
        return list(items)[self.rank::self.world_size]

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a one-element list in one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # -- forward and backward -----------------------------------------------------------------------
    def autocast(self):
        """Mixed-precision autocast of compute.mixed_precision (nothing when it is `no`)."""
        if self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    def prepare(self, model, optimizer):
        """(model for forward passes, optimizer): wrapped by accelerate (DDP/FSDP/DeepSpeed, loss scaler),
        or unchanged in plain python."""
        if self.accelerator is None:
            return model, optimizer
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        self._prepared[id(model)] = wrapped
        return wrapped, optimizer

    def no_sync(self, wrapped, sync: bool):
        """No gradient all-reduce for this backward unless ``sync`` (the rank's last one of the step)."""
        if sync or self.accelerator is None or not self.distributed:
            return contextlib.nullcontext()
        return self._no_sync(wrapped)

    @contextlib.contextmanager
    def _no_sync(self, wrapped):
        state = self.accelerator.gradient_state  # DeepSpeed steps its engine in backward unless sync_gradients is off
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(wrapped):
                yield
        finally:
            state._set_sync_gradients(True)

    def backward(self, loss) -> None:
        """Backward of a loss that is this rank's share of a sum over ranks (DDP's mean is made a sum)."""
        if self.accelerator is None:
            loss.backward()
            return
        if self.distributed:
            loss = loss * self.world_size
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters, max_norm: float) -> float:
        import torch

        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()
        norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def full_state_dict(self, model) -> dict | None:
        """The whole state dict of ``model`` (as prepared by ``prepare``) gathered from the shards of fsdp or
        deepspeed; None for ddp and plain python, whose model holds all its weights.  Every rank must call it."""
        wrapped = self._prepared.get(id(model))
        if wrapped is None or self.strategy == "ddp" or not self.distributed:
            return None
        return self.accelerator.get_state_dict(wrapped)

    def close(self) -> None:
        """Wait for every rank, then leave the process group (the plain runtime does nothing)."""
        global _CURRENT
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        _CURRENT = None


_CURRENT: Runtime | None = None


def current() -> Runtime:
    """The runtime started by this process's stage, or a plain single-process one on the CPU."""
    if _CURRENT is not None:
        return _CURRENT
    import torch

    return Runtime(device=torch.device("cpu"))


def start_runtime(params) -> Runtime:
    """Resolve the device and, when launched with several processes or asked for mixed precision, join
    the process group through accelerate.  The runtime becomes ``current()`` until ``close()``."""
    global _CURRENT
    from rlhf_core.models import _pick_device, resolve_device

    compute = params.compute
    world_size = env_world_size()
    device = _pick_device(params.device)
    check_compute(compute, device.type)
    if world_size == 1 and compute.mixed_precision == "no":
        _CURRENT = Runtime(device=resolve_device(params.device, params.cpu_threads))
        return _CURRENT

    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if world_size == 1:  # in process (tests run many stages in one interpreter): accelerate's state is a singleton
        AcceleratorState._reset_state(reset_partial_state=True)
    cpu = device.type == "cpu"
    accelerator = Accelerator(cpu=cpu, mixed_precision=compute.mixed_precision, device_placement=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if cpu or world_size == 1:  # one process: the device as params say (e.g. cuda:1); cpu_threads as in plain runs
        device = resolve_device(params.device, params.cpu_threads)
    else:  # one GPU per rank
        device = accelerator.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
    runtime = Runtime(device=device, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, accelerator=accelerator, strategy=compute.strategy)
    if not runtime.is_main:  # one progress display and one log, from rank 0
        os.environ["RLHF_PROGRESS"] = "off"
    _CURRENT = runtime
    return runtime
