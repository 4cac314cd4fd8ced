"""One stage, one or several processes: the runtime that rollout and optimize run under.

``compute.num_processes: 1`` (the default) runs a stage in process as plain python: ``start_runtime``
returns a single-process runtime whose every method is the identity, and nothing of accelerate is
imported.  With more processes, ``python -m rlhf_core.launch`` starts the stage under
``accelerate launch`` (torchrun underneath), and ``start_runtime`` joins the process group through
``accelerate.Accelerator``: NCCL on GPUs, gloo on CPU.  Then

- rollout gives whole generation batches to ranks round-robin (each batch seeded as in one process),
  gathers the samples and the per-token stats, and rank 0 alone writes the one Parquet file;
- optimize gives every rank every W-th micro-batch of each minibatch; the model is wrapped by
  accelerate (ddp: DDP) or sharded here with FSDP2's ``fully_shard``
  (fsdp: one unit per transformer block; the optimizer is built after sharding, over the shards),
  the losses, already normalised by the whole minibatch's token count, are scaled by W so that the
  gradient mean over ranks is a sum, and the stats are combined in the global micro-batch order, so
  every rank takes the same early-stop decision.  Rank 0 writes the checkpoint (fsdp: the full state
  dict gathered onto it).

``compute.mixed_precision`` (bf16 / fp16) also goes through the Accelerator (autocast, and the loss
scaler of fp16), in one process as in several.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from rlhf_core.errors import ConfigError



def check_compute(compute, device_type: str) -> None:
    """Checks of the compute params that need the resolved device (``device: auto`` may be a CPU)."""
    if device_type == "cuda" and compute.num_processes > 1:
        import torch

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or compute.num_processes)
        available = torch.cuda.device_count()
        if local_processes > available:
            raise ConfigError(f"compute.num_processes = {compute.num_processes}: this machine has {available} CUDA "
                              f"device(s) and each process needs its own; set compute.num_processes <= {available}")
    if device_type == "cpu" and compute.mixed_precision == "fp16":
        raise ConfigError("compute.mixed_precision = 'fp16': not supported on CPU (the device resolved to cpu); "
                          "must be 'no' or 'bf16' on CPU")


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

    def prepare(self, model, build_optimizer):
        """(model for forward passes, optimizer, scheduler, trainable parameters), in that order of making:

        1. the model is wrapped or sharded (fsdp: ``shard_fsdp2``, each transformer block one unit), which for
           fsdp replaces every parameter by a DTensor shard;
        2. the trainable parameters are read from the model as it now is, and ``build_optimizer(trainable)``
           returns (optimizer, scheduler) over them, so the optimizer steps and ``clip_grad_norm_`` clips the
           very tensors that receive gradients;
        3. ddp: accelerate wraps model and optimizer (DDP, the fp16 loss scaler).
        In plain python nothing is wrapped."""
        if self.strategy == "fsdp" and self.distributed:
            shard_fsdp2(model, self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(trainable)
        if self.accelerator is None or self.strategy == "fsdp":
            return model, optimizer, scheduler, trainable
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        return wrapped, optimizer, scheduler, trainable

    def no_sync(self, wrapped, sync: bool):
        """No gradient all-reduce for this backward unless ``sync`` (the rank's last one of the step).

        fsdp reduce-scatters after every backward instead: skipping it would keep every unit's gradient
        unsharded until the step (FSDP2's ``set_requires_gradient_sync(False)``), the whole model's worth,
        which is the memory sharding is there to save.  Every rank runs as many backwards, so they pair up."""
        if sync or self.accelerator is None or not self.distributed or self.strategy == "fsdp":
            return contextlib.nullcontext()
        return self._no_sync(wrapped)

    @contextlib.contextmanager
    def _no_sync(self, wrapped):
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            with self.accelerator.no_sync(wrapped):
                yield
        finally:
            state._set_sync_gradients(True)

    def backward(self, loss) -> None:
        """Backward of a loss that is this rank's share of a sum over ranks (the mean that DDP and FSDP take
        over ranks is made a sum)."""
        if self.distributed:
            loss = loss * self.world_size
        if self.accelerator is None or self.strategy == "fsdp":
            loss.backward()
            return
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters, max_norm: float) -> float:
        """Clip the global gradient norm of ``parameters`` (DTensor shards under fsdp: the norm is over the whole
        model, every rank gets it) to ``max_norm``; return the norm before clipping."""
        import torch

        if self.accelerator is None or self.strategy == "fsdp":
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor of partial norms
            norm = norm.full_tensor()
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def full_state_dict(self, model) -> dict | None:
        """The whole state dict of ``model`` gathered from the fsdp shards onto rank 0 (other ranks get an empty
        dict); None for ddp and plain python, whose model holds all its weights.  Every rank must call it."""
        if not self.distributed or self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's whole per-parameter state, keyed by parameter name (fsdp: gathered from the shards;
        on CPU, on rank 0; other ranks get an empty dict).  Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)).get("state", {})

    def load_optimizer_state(self, model, optimizer, state: dict | None) -> None:
        """Give ``optimizer`` the per-parameter ``state`` (from ``optimizer_state``, read on rank 0; the other
        ranks pass None and get their shards by broadcast), keeping its own param groups (this round's lr,
        schedule and weight decay).  Raises ConfigError when the state names parameters the model does not train."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from rlhf_core.errors import ConfigError

        optimizer = getattr(optimizer, "optimizer", optimizer)
        name_of = {id(p): name for name, p in model.named_parameters()}
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [name_of[id(p)] for p in group["params"]]} for group in optimizer.param_groups]
        if self.is_main:
            trained = {name for group in groups for name in group["params"]}
            unknown = sorted(set(state or {}) - trained)  # a parameter never given a gradient (grpo's value head) has none
            if unknown:
                raise ConfigError(f"the carried optimizer state is for other parameters ({', '.join(unknown[:3])}, ...):"
                                  " the checkpoint was trained with other lora/critic settings")
        set_optimizer_state_dict(model, optimizer, {"state": state or {}, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False,
                                                          broadcast_from_rank0=self.distributed))

    def close(self) -> None:
        """Wait for every rank, then leave the process group (the plain runtime does nothing)."""
        global _CURRENT
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        _CURRENT = None


def shard_fsdp2(model, device) -> None:
    """Shard ``model`` (an ActorCritic) in place with FSDP2 over all ranks: each transformer block of the policy
    (and of a separate critic backbone) is one unit, gathered for its own forward and backward and freed after;
    so are the input embeddings and an untied LM head, and the value head; the rest (the final norm, tied
    embeddings) is the root unit.  Every parameter becomes a DTensor shard of 1/world_size of its rows."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlhf_core.models import transformer_blocks

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for part in (model.policy, model.critic_backbone):
        if part is None:
            continue
        for block in transformer_blocks(part):
            fully_shard(block, mesh=mesh)
        # The input embeddings and an untied LM head are units of their own: in the root they would stay
        # gathered (with full gradients) through the whole forward and backward, and with a 32k-150k
        # vocabulary they are a large part of the model.  Tied ones share one tensor: they stay in the root.
        embeddings = part.get_input_embeddings()
        head = part.get_output_embeddings() if hasattr(part, "get_output_embeddings") else None
        if head is not None and head.weight is embeddings.weight:
            continue
        for module in (embeddings, head):
            if module is not None:
                fully_shard(module, mesh=mesh)
    fully_shard(model.value_head, mesh=mesh)  # float32 whatever compute.param_dtype: a unit of its own dtype
    fully_shard(model, mesh=mesh)
    # ActorCritic returns [B, R] views (gathered log-probs, squeezed values); nothing writes into them in place,
    # which is what this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def local_parameter_bytes(model) -> int:
    """Bytes of the parameters this process holds: its shards under fsdp, the whole model otherwise."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return int(total)


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
