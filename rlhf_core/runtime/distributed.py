"""One stage, one or several processes: the runtime that rollout and optimize run under.

``compute.num_processes: 1`` (the default) runs a stage in process as plain python: ``start_runtime``
returns a single-process runtime whose every method is the identity, and nothing of accelerate is
imported.  With more processes, ``python -m rlhf_core.runtime.launch`` starts the stage under
``accelerate launch`` (torchrun underneath), and ``start_runtime`` joins the process group through
``accelerate.Accelerator``: NCCL on GPUs, gloo on CPU.  Then

- rollout gives whole generation batches to ranks round-robin (each batch seeded as in one process),
  gathers the samples and the per-token stats, and rank 0 alone writes the one Parquet file;
- optimize gives every rank every W-th micro-batch of each minibatch; the model is wrapped by
  accelerate (ddp: DDP), sharded here with FSDP2's ``fully_shard``
  (fsdp: one unit per transformer block; the optimizer is built after sharding, over the shards), or
  handed with its AdamW to ``deepspeed.initialize`` (deepspeed: ZeRO-2 or ZeRO-3, ``deepspeed_config``),
  the losses, already normalised by the whole minibatch's token count, are scaled by W so that the
  gradient mean over ranks is a sum, and the stats are combined in the global micro-batch order, so
  every rank takes the same early-stop decision.  Rank 0 writes the checkpoint (fsdp, ZeRO-3: the full
  state dict gathered onto it).

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
    zero_stage: int = 2  # compute.zero_stage under deepspeed
    engine: Any = None  # the DeepSpeed engine, once ``prepare`` has made it
    engine_max_grad_norm: float | None = None  # the clipping norm the engine was configured with

    @property
    def deepspeed(self) -> bool:
        """Whether optimize's model goes to a DeepSpeed engine (compute.strategy: deepspeed, several processes)."""
        return self.strategy == "deepspeed" and self.distributed

    @property
    def load_device(self):
        """Where optimize loads the model: the meta device on fsdp ranks other than 0, which read no weights and get
        their shards from rank 0 (``shard_fsdp2_from_rank0``), so only one process holds the whole model while
        loading; ``device`` otherwise."""
        import torch

        if self.strategy == "fsdp" and self.distributed and not self.is_main:
            return torch.device("meta")
        return self.device

    @property
    def plain_backward(self) -> bool:
        """Whether backward and clipping are torch's own: plain python, and fsdp (FSDP2 needs no wrapper)."""
        return self.accelerator is None or self.strategy == "fsdp"

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

    def prepare(self, model, build_optimizer, micro_batch_size: int = 1, max_grad_norm: float | None = None):
        """(model for forward passes, optimizer, scheduler, trainable parameters), in that order of making:

        1. the model is wrapped or sharded (fsdp: ``shard_fsdp2_from_rank0``, each transformer block one unit),
           which for fsdp replaces every parameter by a DTensor shard (filled from rank 0 where a rank loaded the
           structure only: ``load_device``);
        2. the trainable parameters are read from the model as it now is, and ``build_optimizer(trainable)``
           returns (optimizer, scheduler) over them, so the optimizer steps and ``clip_and_step`` clips the
           very tensors that receive gradients;
        3. ddp: accelerate wraps model and optimizer (DDP, the fp16 loss scaler); deepspeed: ``deepspeed.initialize``
           takes the model and that AdamW (``deepspeed_config``: ZeRO stage, ``micro_batch_size`` and the clipping
           norm ``max_grad_norm``; ZeRO-3 partitions the parameters here) and returns the engine, which is the
           model for forward passes, and its ZeRO optimizer.  The scheduler keeps driving the AdamW's param groups,
           which ZeRO keeps.
        In plain python nothing is wrapped."""
        if self.strategy == "fsdp" and self.distributed:
            shard_fsdp2_from_rank0(model, self.device, self)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(trainable)
        if self.deepspeed:
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
            if self.zero_stage == 3 and len(dtypes) > 1:  # ZeRO-3 packs every rank's partitions into one buffer
                from rlhf_core.config import ZERO3_ONE_DTYPE_HINT

                raise ConfigError(f"compute.zero_stage = 3: needs every weight in one dtype, got {' and '.join(dtypes)} "
                                  f"(the value head stays float32); {ZERO3_ONE_DTYPE_HINT}")
            from rlhf_core.model.loading import hidden_size_of

            self.engine_max_grad_norm = max_grad_norm
            self.engine, optimizer = initialize_deepspeed(model, optimizer, deepspeed_config(
                self.zero_stage, micro_batch_size, self.world_size, max_grad_norm,
                hidden_size_of(model.policy.config)), self.device)
            return self.engine, optimizer, scheduler, trainable
        if self.accelerator is None or self.strategy == "fsdp":
            return model, optimizer, scheduler, trainable
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        return wrapped, optimizer, scheduler, trainable

    def no_sync(self, wrapped, sync: bool):
        """No gradient all-reduce for this backward unless ``sync`` (the rank's last one of the step).

        fsdp reduce-scatters after every backward instead: skipping it would keep every unit's gradient
        unsharded until the step (FSDP2's ``set_requires_gradient_sync(False)``), the whole model's worth,
        which is the memory sharding is there to save.  deepspeed: ``sync`` marks the gradient-accumulation
        boundary (``set_gradient_accumulation_boundary``), the backward after which ZeRO's reduction completes
        and ``engine.step`` steps.  Every rank runs as many backwards, so they pair up."""
        if self.deepspeed:
            wrapped.set_gradient_accumulation_boundary(sync)
            return contextlib.nullcontext()
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
        """Backward of a loss that is this rank's share of a sum over ranks (the mean that DDP, FSDP and ZeRO take
        over ranks is made a sum)."""
        if self.distributed:
            loss = loss * self.world_size
        if self.deepspeed:
            self.engine.backward(loss)
        elif self.plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def _clip_grad_norm(self, parameters, max_norm: float) -> float:
        """Clip the global gradient norm of ``parameters`` (DTensor shards under fsdp: the norm is over the whole
        model, every rank gets it) to ``max_norm``; return the norm before clipping.  Not deepspeed, whose engine
        clips inside its step (``clip_and_step``)."""
        import torch

        if self.plain_backward:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor of partial norms
            norm = norm.full_tensor()
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def clip_and_step(self, optimizer, parameters, max_norm: float | None, check) -> float:
        """One optimizer step on the accumulated gradient, clipped to the global norm ``max_norm`` (None: not
        clipped); returns the norm before clipping, which ``check(norm)`` has seen (it raises on a NaN).

        Plain, ddp and fsdp: clip, ``check``, then step, so a non-finite gradient never reaches the weights.
        deepspeed: the engine computes the norm over ZeRO's gradient partitions, clips (the config's
        ``gradient_clipping``, ``max_norm`` as given to ``prepare``) and steps in one call, then ``check`` sees the
        norm.  ZeRO skips a step whose norm is not finite and reports inf (with float32 weights first; with
        bfloat16 ones it may step), and either way ``check`` stops the stage before anything is written."""
        import math

        if self.deepspeed:
            if max_norm != self.engine_max_grad_norm:
                raise ValueError(f"clip_and_step: max_norm {max_norm} is not the engine's {self.engine_max_grad_norm}")
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm.item() if hasattr(norm, "item") else norm)
            check(norm)
            return norm
        norm = self._clip_grad_norm(parameters, math.inf if max_norm is None else max_norm)
        check(norm)
        optimizer.step()
        return norm

    def full_state_dict(self, model) -> dict | None:
        """The whole state dict of ``model`` gathered from the fsdp shards (or ZeRO-3's partitions, one module at
        a time) onto rank 0 (other ranks get an empty dict or None); None for ddp, ZeRO-2 and plain python, whose
        model holds all its weights.  Every rank must call it."""
        if self.deepspeed and self.engine is not None and self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()  # the documented gather (accelerate's too)
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
        """Wait for every rank, then leave the process group (the plain runtime does nothing).  After it, the
        process should end through ``leave_process`` (``run_stage`` does)."""
        global _CURRENT, _LEFT_A_PROCESS_GROUP
        if self.distributed:
            import torch.distributed as dist

            if self.engine is not None:  # its ZeRO threads and buffers go before the process group
                self.engine.destroy()
                self.engine = None
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            _LEFT_A_PROCESS_GROUP = True
        _CURRENT = None


# Set by Runtime.close in a process that was one rank of several.
_LEFT_A_PROCESS_GROUP = False


def left_a_process_group() -> bool:
    """Whether this process closed a distributed runtime, so it must end through ``leave_process``."""
    return _LEFT_A_PROCESS_GROUP


def leave_process(code: int = 0) -> None:
    """End a rank's process without the interpreter's teardown, once its outputs are written and its runtime is
    closed.  Gloo's worker threads outlive ``destroy_process_group`` while a C++ object still holds the group
    (after DeepSpeed, two groups and four threads remain); the teardown then destroys the group under them and
    the process dies of SIGABRT ("terminate called without an active exception") after a stage that succeeded:
    seen in about 1 of 8 two-rank ZeRO-3 runs (pytorch/pytorch#179291 describes the mechanism)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def shard_fsdp2(model, device) -> None:
    """Shard ``model`` (an ActorCritic) in place with FSDP2 over all ranks: each transformer block of the policy
    (and of a separate critic backbone) is one unit, gathered for its own forward and backward and freed after;
    so are the input embeddings and an untied LM head, and the value head; the rest (the final norm, tied
    embeddings) is the root unit.  Every parameter becomes a DTensor shard of 1/world_size of its rows."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlhf_core.model.loading import transformer_blocks

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


def deepspeed_config(zero_stage: int, micro_batch_size: int, world_size: int, max_grad_norm: float | None,
                     hidden_size: int) -> dict:
    """The DeepSpeed config of compute.strategy: deepspeed, for ``deepspeed.initialize`` (no dataloader, no file):

    - ``zero_optimization.stage``: 2 (gradients and AdamW state partitioned across ranks) or 3 (the parameters too);
    - integer batch sizes: ``train_micro_batch_size_per_gpu`` = optim.micro_batch_size and
      ``gradient_accumulation_steps`` 1 (DeepSpeed scales no loss by it): the update loop marks the accumulation
      boundary itself (``Runtime.no_sync``), and its losses are already normalised by the whole minibatch;
    - ``gradient_clipping`` = optim.max_grad_norm (0: DeepSpeed's "off", for null);
    - bf16 and fp16 off: the weights come in compute.param_dtype and the value head stays float32, so DeepSpeed must
      not cast the module (its bf16 mode would cast the value head too); ZeRO keeps a float32 copy of each rank's
      partition for AdamW, also of bfloat16 weights.  compute.mixed_precision bf16 autocasts the forward as
      elsewhere;
    - ``zero_allow_untested_optimizer``: the optimizer is torch's AdamW (``optim.make_optimizer``);
    - communication buckets sized by the model's ``hidden_size`` h, as transformers' Trainer sizes DeepSpeed's "auto":
      h² elements per reduce / all-gather bucket, 0.9·h² to prefetch, and tensors under 10·h kept whole under ZeRO-3.
      DeepSpeed's defaults (5·10⁸ elements) are for large models: with a 60M-parameter model they took 2.3 GB more
      per process than one process's whole round."""
    bucket = hidden_size * hidden_size + (hidden_size * hidden_size) % 2  # ZeRO-2 wants an even all-gather bucket
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": 0.0 if max_grad_norm is None else float(max_grad_norm),
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket,
                              **({"stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                                  "stage3_param_persistence_threshold": 10 * hidden_size} if zero_stage == 3 else
                                 {"allgather_bucket_size": bucket})},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def require_deepspeed() -> None:
    """One line, not an ImportError traceback, when compute.strategy is deepspeed and deepspeed is not installed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("compute.strategy = 'deepspeed': deepspeed is not installed; `pip install deepspeed` "
                          "(requirements.lock has it), or use strategy fsdp")


def initialize_deepspeed(model, optimizer, config: dict, device):
    """``deepspeed.initialize`` on the process group that accelerate started: (engine, ZeRO optimizer).
    DeepSpeed's accelerator is the stage's device type (``DS_ACCELERATOR``: cpu runs over gloo), and its
    INFO logging is turned down to warnings."""
    import logging
    import warnings

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    require_deepspeed()
    import deepspeed

    logger = logging.getLogger("DeepSpeed")
    logger.setLevel(logging.WARNING)
    # ZeRO-3 hooks look for tensors in each module's inputs and outputs; the ActorCritic's own (a TokenBatch in, a
    # ForwardOutput out) are not containers it knows, but it holds no parameter of its own: its submodules' hooks
    # (transformer blocks, value head) see plain tensors and model outputs.
    logger.addFilter(lambda record: "unknown inputs or outputs type" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)  # DeepSpeed's collectives, torch 2.13
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, ds_optimizer


def shard_fsdp2_from_rank0(model, device, runtime) -> None:
    """``shard_fsdp2`` where the ranks other than 0 may have built ``model`` on the meta device (``load_device``):
    rank 0's whole state dict, taken before sharding, is broadcast into every rank's shards
    (``set_model_state_dict(broadcast_from_rank0=True)``), and its buffers too (rotary tables are not in the state
    dict).  Rank 0's dtypes win over a meta rank's (``param_dtype: auto`` resolves from the weights there); a rank whose
    parameter names or shapes differ from rank 0's stops with one line.  When every rank loaded its weights this is
    plain ``shard_fsdp2``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    empty = any(p.is_meta for p in model.parameters())
    if not any(runtime.all_gather(empty)):
        shard_fsdp2(model, device)
        return
    tensors = [*model.named_parameters(), *model.named_buffers()]
    layouts = runtime.all_gather([(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors])
    rank0_layout = layouts[0]
    for rank, layout in enumerate(layouts):  # every rank sees every layout, so every rank stops alike
        if [entry[:2] for entry in layout] != [entry[:2] for entry in rank0_layout]:
            from rlhf_core.errors import DataError

            theirs = {entry[:2] for entry in layout}
            differing = [name for name, shape, _ in rank0_layout if (name, shape) not in theirs][:3]
            raise DataError(f"fsdp: rank {rank} built a model whose parameters differ from rank 0's "
                            f"({', '.join(differing) or 'their order'}): every machine must see the same checkpoint "
                            "(the shared filesystem of compute.num_machines)")
    if empty:  # rank 0's dtypes, parameters and buffers (a bf16 cast also casts rotary tables); free on meta
        for (_, tensor), (_, _, dtype) in zip(tensors, rank0_layout):
            tensor.data = tensor.data.to(getattr(torch, dtype))
    full = model.state_dict() if runtime.is_main else {}
    shard_fsdp2(model, device)
    if empty:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def local_parameter_bytes(model) -> int:
    """Bytes of the parameters this process holds: its shards under fsdp and ZeRO-3, the whole model otherwise."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else getattr(parameter, "ds_tensor", parameter)
        if local.is_meta:  # built without weights (load_device)
            continue
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
    from rlhf_core.model.device import pick_device, resolve_device

    compute = params.compute
    world_size = env_world_size()
    device = pick_device(params.device)
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
    runtime = Runtime(device=device, rank=accelerator.process_index, world_size=accelerator.num_processes,
                      accelerator=accelerator, strategy=compute.strategy, zero_stage=compute.zero_stage or 2)
    if runtime.deepspeed:  # before any model is loaded
        require_deepspeed()
    if not runtime.is_main:  # one progress display and one log, from rank 0
        os.environ["RLHF_PROGRESS"] = "off"
    _CURRENT = runtime
    return runtime
