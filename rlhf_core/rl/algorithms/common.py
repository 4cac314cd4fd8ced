"""What every policy optimizer shares: the round's experience, micro-batching, and parameter groups.

Every algorithm runs through one function with one signature (``train.train_round``),

    train_round(model, experience, params, *, temperature, pad_id, device, seed, log, carry=None,
                critic_warmup_epochs=0) -> metrics dict

which updates ``model`` (an ``rlhf_core.model.forward.ActorCritic``) in place on one round of data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_core.model.batches import TokenBatch, collate, length_buckets
from rlhf_core.model.loading import transformer_blocks
from rlhf_core.rl.advantages import pad_sequences
from rlhf_core.rl.kl import kl_estimate
from rlhf_core.rl.losses import aggregate, masked_sum
from rlhf_core.rl.optim import make_optimizer
from rlhf_core.runtime.progress import Progress
from rlhf_core.runtime.stage_times import add_work


@dataclass
class MicroBatch:
    """A collated micro-batch: the token batch plus [B, R] tensors aligned with its response columns."""

    batch: TokenBatch
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None  # None in the KL-free mode (no kl.loss_coef, nothing reads it)
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    correction: torch.Tensor | None = None  # rollout_correction's weights on the policy loss (None: all 1)
    policy_mask: torch.Tensor | None = None  # multi-turn episodes: 1 on the policy's tokens, 0 on the environment's

    @property
    def mask(self) -> torch.Tensor:
        """[B, R] 1 where a response token is trained on: a real token (not padding) that the policy sampled
        (an environment's tokens in an episode are context only: no loss, no gradient, not counted)."""
        if self.policy_mask is None:
            return self.batch.response_mask
        return self.batch.response_mask * self.policy_mask


@dataclass
class Experience:
    """The round's data, one entry per response (ragged token arrays)."""

    prompt_ids: list
    response_ids: list
    old_logprobs: list
    ref_logprobs: list | None  # None in the KL-free mode (Params.uses_reference False)
    old_values: list
    advantages: list
    returns: list
    rewards: list | None = None  # the advantages stage's token rewards: the critic warm-up recomputes GAE from them
    correction: list | None = None  # per-token weights of the policy loss (rollout_correction: tis / mis)
    policy_mask: list | None = None  # episodes: per response token, 1 sampled by the policy, 0 the environment's
    # set by select: the whole round and the flags of the rows kept, since the advantages stage whitened over every
    # row of the round, the left-out ones too (advantages.mask_truncated); the critic warm-up's refresh does the same
    whole_round: tuple | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, keep: list[bool]) -> "Experience":
        """The rows where ``keep`` is true (advantages' ``trained`` column: overlong filtering), in their order."""
        rows = [index for index, kept in enumerate(keep) if kept]
        if len(keep) != len(self):
            raise ValueError(f"select: {len(keep)} flags for {len(self)} responses")

        def pick(arrays):
            return None if arrays is None else [arrays[index] for index in rows]

        whole, flags = self.whole_round or (self, [True] * len(self))
        kept_in_whole = [flag and kept for flag, kept in zip(flags, _spread(keep, flags))]
        picked = {field.name: pick(getattr(self, field.name)) for field in dataclasses.fields(self)
                  if field.name != "whole_round"}
        return Experience(**picked, whole_round=(whole, kept_in_whole))

    def tokens(self, indices) -> int:
        """The trained tokens of the rows ``indices``: every response token, or the policy's (``policy_mask``)."""
        if self.policy_mask is not None:  # summed as int64: the stored int8 masks would wrap at 127 under sum()
            return int(sum(int(np.asarray(self.policy_mask[i]).sum(dtype=np.int64)) for i in indices))
        return int(sum(len(self.response_ids[i]) for i in indices))

    def length_groups(self, indices: list[int], size: int) -> list[list[int]]:
        """``indices`` cut into groups of at most ``size`` rows of similar sequence length (prompt + response),
        so micro-batches collated from them carry almost no padding (``models.length_buckets``)."""
        lengths = [len(self.prompt_ids[i]) + len(self.response_ids[i]) for i in indices]
        return [[indices[j] for j in group] for group in length_buckets(lengths, size)]

    def micro_batch(self, indices: list[int], pad_id: int, device) -> MicroBatch:
        """Collate ``indices`` (``models.collate``: each row prompt + response, left-padded) with the per-token
        arrays right-padded to the batch's longest response, aligned with its ``response_ids``."""
        batch = collate([list(self.prompt_ids[i]) for i in indices], [list(self.response_ids[i]) for i in indices],
                        pad_id)
        width = batch.response_mask.shape[1]

        def padded(arrays):
            values, _ = pad_sequences([arrays[i] for i in indices])
            if values.shape[1] < width:
                values = torch.nn.functional.pad(values, (0, width - values.shape[1]))
            return values.to(device)

        return MicroBatch(batch.to(device), padded(self.old_logprobs),
                          None if self.ref_logprobs is None else padded(self.ref_logprobs),
                          padded(self.old_values), padded(self.advantages), padded(self.returns),
                          None if self.correction is None else padded(self.correction),
                          None if self.policy_mask is None else padded(self.policy_mask))


def split(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of at most ``size``."""
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def lora_parameter_ids(model) -> set[int]:
    """``id``s of the LoRA adapter weights of the model as it is now (after sharding: the sharded ones)."""
    return {id(p) for name, p in model.named_parameters() if "lora_" in name}


def critic_parameters(model) -> list[torch.nn.Parameter]:
    """The critic's own parameters: the value head, plus the separate backbone when there is one."""
    params = list(model.value_head.parameters())
    if model.critic_backbone is not None:
        params += list(model.critic_backbone.parameters())
    return params


def policy_parameters(model, last_n_blocks: int | None = None) -> list[torch.nn.Parameter]:
    """The policy's parameters, or only its last N transformer blocks + final norm + LM head.

    Blocks are ``models.transformer_blocks`` (the model's ``_no_split_modules``, else its longest
    ``nn.ModuleList``).  With a restriction, every other policy parameter is frozen
    (``requires_grad = False``) so autograd skips it.  When the LM head is tied to the input
    embeddings (``tie_word_embeddings``), training the head also changes the embeddings: they are one
    tensor.
    """
    policy = model.policy
    if last_n_blocks is None:  # all of them; with LoRA, the adapters (the base weights are frozen)
        return [p for p in policy.parameters() if p.requires_grad]
    blocks = transformer_blocks(policy)
    chosen = {id(p) for block in blocks[len(blocks) - last_n_blocks:] for p in block.parameters()}
    head = policy.get_output_embeddings()
    chosen |= {id(p) for p in head.parameters()}
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    embeddings = {id(p) for p in policy.get_input_embeddings().parameters()}
    for name, p in policy.named_parameters():  # the final norm: not in a block, not an embedding
        outside_blocks = id(p) not in in_blocks and id(p) not in embeddings
        if outside_blocks and ("norm" in name.lower() or ".ln_f." in name):
            chosen.add(id(p))
    selected = []
    for p in policy.parameters():
        p.requires_grad_(id(p) in chosen)
        if id(p) in chosen:
            selected.append(p)
    return selected


def correction_weights(old_logprobs: list, sampler_logprobs: list, settings, mode: str) -> tuple[list, dict]:
    """rollout_correction's per-token weights for a round (``losses.sampler_correction`` with ``settings``, a
    RolloutCorrectionParams, and ``mode`` tis or mis), ragged like the log-probs, and their metrics: the share of
    tokens the cap bit (tis) or that were dropped (mis), and the mean weight."""
    from rlhf_core.rl.losses import sampler_correction

    old_t, mask = pad_sequences(old_logprobs)
    weights, affected = sampler_correction(old_t, pad_sequences(sampler_logprobs)[0], mask, mode=mode,
                                           level=settings.level, cap=settings.tis_cap, low=settings.mis_low,
                                           high=settings.mis_high)
    lengths = mask.sum(-1).long().tolist()
    tokens = float(mask.sum())
    metrics = {f"correction_{'capped' if mode == 'tis' else 'masked'}_fraction": float(affected.sum()) / tokens,
               "correction_weight_mean": float(weights.sum()) / tokens}
    return [weights[row, :n].tolist() for row, n in enumerate(lengths)], metrics


def corrected(policy_loss: torch.Tensor, micro) -> torch.Tensor:
    """The per-token policy loss [B, T] times rollout_correction's weights, when the round has them."""
    return policy_loss if micro.correction is None else policy_loss * micro.correction


def add_kl_loss(loss, stats: dict, out, micro, loss_coef: float, estimator: str, agg):
    """``loss + loss_coef · agg(k(log π_θ, log π_ref))`` (kl.loss_coef resolved, k = kl.loss_estimator), when
    loss_coef > 0 (shapes [B, T]); the term's masked sum goes to ``stats['kl_ref']``."""
    if loss_coef <= 0:
        return loss
    kl_ref = kl_estimate(estimator, out.logprobs, micro.ref_logprobs)
    stats["kl_ref"] = masked_sum(kl_ref, micro.mask)
    return loss + loss_coef * agg(kl_ref)


def round_experience(params, rollouts, advantages) -> tuple[Experience, dict]:
    """The rows of the round that the update trains on (the advantages stage's ``trained`` column: dynamic sampling,
    mask_truncated), as an Experience, with rollout_correction's per-token weights when the sampler μ was not the
    trainer π_old (tis weighs the policy loss, mis drops tokens).  rollouts, advantages: the two stages' tables.
    Returns (experience, the correction's metrics)."""
    experience = Experience(rollouts["prompt_ids"].tolist(), rollouts["response_ids"].tolist(),
                            rollouts["logprobs"].tolist(),
                            rollouts["ref_logprobs"].tolist() if params.uses_reference else None,
                            rollouts["values"].tolist(), advantages["advantages"].tolist(),
                            advantages["returns"].tolist(), rewards=advantages["rewards"].tolist(),
                            policy_mask=rollouts["policy_mask"].tolist() if "policy_mask" in rollouts else None)
    trained = advantages["trained"].astype(bool).tolist()
    experience = experience.select(trained)
    correction, metrics = params.sampler_correction, {}
    if correction != "none":
        sampler = [row for row, kept in zip(rollouts["sampler_logprobs"].tolist(), trained) if kept]
        experience.correction, metrics = correction_weights(experience.old_logprobs, sampler,
                                                            params.rollout_correction, correction)
    return experience, metrics


def finite_or_raise(value: float, what: str, hint: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}; {hint}")
    return value


PROGRESS_STATS = ("policy_loss", "approx_kl", "clip_fraction")  # shown live next to the step count


def minibatch_updates(model, experience: Experience, params, *, epochs: int, loss_fn, temperature: float, pad_id: int,
                      device, seed: int, log=print, stop_fn=None, name: str = "update", carry: dict | None = None,
                      critic_warmup_epochs: int = 0) -> dict:
    """The gradient-step loop shared by the first-order optimizers (ppo, grpo, reinforce, a2c, rloo):

        for epoch in 1..epochs:
            shuffle the responses; cut them into minibatches of optim.minibatch_size
            for each minibatch:
                for each micro-batch of optim.micro_batch_size:            # gradient accumulation
                    loss, sums = loss_fn(model(micro-batch), micro-batch, totals)
                    loss.backward()                                      # loss already normalised by totals
                stats = sums / tokens of the minibatch
                if stop_fn(stats): drop this step and stop                # e.g. approx-KL > target_kl
                clip grad norm; AdamW step; LR schedule step

    ``loss_fn(out, micro, totals)`` gets the forward output, the MicroBatch and
    ``{"tokens": …, "sequences": …}`` of the whole minibatch, and returns (scalar loss, {stat: masked sum});
    stats named ``max_*`` are maxima and are combined by max instead.
    Returns the mean of every stat over the optimizer steps, plus grad_norm, learning_rate,
    optimizer_steps, planned_steps, early_stopped and the first minibatch's stats (``first_*``).

    ``critic_warmup_epochs`` (algorithm.critic_warmup_epochs, on a round whose critic is new): before the loop
    above, that many epochs of the same minibatches with the value loss alone, ½ agg((V − R)²), stepping only the
    critic's own parameters (the value head, and a separate critic's backbone; every other gradient is dropped
    before the step, so AdamW leaves the policy as it is), at the schedule's peak learning rate; the schedule
    starts after them.  Then the round's advantages and returns are computed again with the warmed critic's
    values (``refresh_advantages``), so the first policy step already uses them.

    ``carry`` (optim.carry_state): AdamW's state carried from round to round (``_prepare``).  Under several
    processes, every rank takes the same step and the same early stop (``_RoundLoop.accumulate``).
    """
    import numpy as np

    from rlhf_core.runtime.distributed import current, local_parameter_bytes

    runtime, optim = current(), params.optim
    per_epoch = math.ceil(len(experience) / optim.minibatch_size)
    total_steps = epochs * per_epoch
    forward_model, optimizer, scheduler, trainable = _prepare(model, params, runtime, total_steps, carry)
    parameter_bytes = local_parameter_bytes(model)
    loop = _RoundLoop(experience, forward_model, optimizer, scheduler, trainable, runtime, optim, pad_id, device,
                      temperature, name, Progress(total_steps, name, unit="step"))
    warmup = {}
    if critic_warmup_epochs:  # its own shuffles: the policy phase's minibatches are those of a run without it
        warmup = critic_warmup(model, experience, optimizer, trainable, runtime, optim, loop.accumulate,
                               np.random.default_rng(seed + 1), critic_warmup_epochs, name, log)
        warmup.update(refresh_advantages(forward_model, experience, params, runtime, pad_id=pad_id, device=device,
                                         temperature=temperature))
    generator, loop_started = np.random.default_rng(seed), time.perf_counter()
    for epoch in range(epochs):
        early_stopped = loop.epoch(generator.permutation(len(experience)).tolist(), loss_fn, stop_fn, epoch, epochs,
                                   log)
        if loop.history:
            log(f"{name} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k} {np.mean(v[-per_epoch:]):.4f}" for k, v in loop.history.items()))
        if early_stopped:
            break
    loop.progress.close()
    add_work("training_tokens", loop.trained_tokens, time.perf_counter() - loop_started)  # response tokens stepped on
    optimizer.zero_grad(set_to_none=True)
    if carry is not None and loop.steps > 0:  # for the next round (optim.carry_state); every rank joins the gather
        carry["state"] = runtime.optimizer_state(model, optimizer)
    # no step taken (an early stop on the first minibatch): the incoming state, if any, goes on unchanged
    return {**{key: float(np.mean(values)) for key, values in loop.history.items()},
            "optimizer_steps": loop.steps, "planned_steps": total_steps, "early_stopped": loop.early_stopped,
            "parameter_bytes_per_process": parameter_bytes,
            **({"zero_stage": runtime.engine.zero_optimization_stage()} if runtime.engine is not None else {}),
            **{f"first_minibatch_{key}": float(value) for key, value in (loop.first or {}).items()}, **warmup}


def _prepare(model, params, runtime, total_steps: int, carry: dict | None):
    """The model as the runtime wraps it and AdamW (with its schedule) over its trainable parameters.  Returns
    (forward model, optimizer, scheduler, trainable parameters).

    ``carry`` (optim.carry_state): a dict whose ``"state"``, when set, is AdamW's per-parameter state from the
    last round (moments and step counts, by parameter name), loaded before the first step; on return from
    ``minibatch_updates`` it holds this round's final state.  The param groups (lr, schedule, weight decay) are
    always this round's."""
    optim = params.optim
    if runtime.deepspeed and not params.traits.trains_critic:
        # grpo, rloo, …: the value head gets no gradient.  AdamW skips such a parameter, but ZeRO zero-fills its
        # gradient and would step it (weight decay would shrink it); out of the optimizer, it stays as it is.
        for parameter in critic_parameters(model):
            parameter.requires_grad_(False)
    # The optimizer is built over the trainable parameters of the model as wrapped (fsdp shards replace them).
    prepared = runtime.prepare(model, lambda trainable: make_optimizer(
        trainable, optim.lr, optim.adam_eps, optim.weight_decay, optim.lr_schedule, optim.warmup_steps, total_steps,
        scaled=lora_parameter_ids(model) if params.lora.enabled else frozenset(), lr_scale=params.lora.lr_scale),
        micro_batch_size=optim.micro_batch_size, max_grad_norm=optim.max_grad_norm)
    if carry is not None:  # AdamW's moments and steps from the last round, when there is one (on rank 0)
        carry["carried_in"] = bool(runtime.all_gather(carry.get("state") is not None)[0])
        if carry["carried_in"]:
            runtime.load_optimizer_state(model, prepared[1], carry.get("state"))
    return prepared


@dataclass
class _RoundLoop:
    """The state of one round's update loop: the optimizer and its schedule, the steps taken, the history of every
    stat per step, the first minibatch's stats, and whether it stopped early."""

    experience: Experience
    forward_model: object
    optimizer: object
    scheduler: object
    trainable: list
    runtime: object
    optim: object
    pad_id: int
    device: object
    temperature: float
    name: str
    progress: object
    steps: int = 0
    trained_tokens: float = 0.0
    early_stopped: bool = False
    first: dict | None = None
    history: dict = dataclasses.field(default_factory=dict)

    def epoch(self, order: list[int], loss_fn, stop_fn, epoch: int, epochs: int, log) -> bool:
        """One pass over the responses in ``order``, cut into minibatches: accumulate, maybe stop early (the
        gradient is dropped, no step), else clip, step AdamW and the schedule.  Returns whether it stopped."""
        for minibatch in split(order, self.optim.minibatch_size):
            stats, totals = self.accumulate(minibatch, loss_fn, epoch)
            self.first = dict(stats) if self.first is None else self.first
            if stop_fn is not None and stop_fn(stats):
                log(f"{self.name}: early stop at epoch {epoch + 1}, step {self.steps + 1}: {stop_fn.__doc__ or ''} "
                    f"{stats}")
                self.optimizer.zero_grad(set_to_none=True)
                self.early_stopped = True
                return True
            stats.update(grad_norm=self.runtime.clip_and_step(
                self.optimizer, self.trainable, self.optim.max_grad_norm, lambda norm: finite_or_raise(
                    norm, f"{self.name} gradient norm (epoch {epoch + 1})", "lower optim.lr")),
                learning_rate=self.scheduler.get_last_lr()[0])
            self.scheduler.step()
            self.steps += 1
            self.trained_tokens += totals["tokens"]
            for key, value in stats.items():
                self.history.setdefault(key, []).append(value)
            self.progress.update(epoch=f"{epoch + 1}/{epochs}", **{k: stats[k] for k in PROGRESS_STATS if k in stats})
        return False

    def accumulate(self, minibatch: list[int], step_loss_fn, epoch: int, phase: str = "") -> tuple[dict, dict]:
        """Forward and backward of every micro-batch of ``minibatch`` (this rank's share), the gradient left in the
        parameters.  Returns (the minibatch's stats: sums / tokens, maxima as they are; its totals).

        Under several processes (``rlhf_core.runtime.distributed.current()``), rank k runs micro-batches k, k+W, … of the
        minibatch (a rank with fewer runs a zero-weight one, so all ranks sync once per step), the gradients are
        summed across ranks at each rank's last backward, and the stat sums are gathered and added in the global
        micro-batch order: every rank takes the same step and the same early stop, and the minibatch (the
        gradient) does not depend on the process count."""
        experience, runtime = self.experience, self.runtime
        totals = {"tokens": float(experience.tokens(minibatch)), "sequences": float(len(minibatch))}
        self.optimizer.zero_grad(set_to_none=True)
        # The minibatch's gradient is the sum over its micro-batches (each loss is normalised by the whole
        # minibatch's totals), so which rows share a micro-batch changes nothing but padding: group by length.
        micro_batches = list(enumerate(experience.length_groups(minibatch, self.optim.micro_batch_size)))
        mine = runtime.shard(micro_batches)
        slots = math.ceil(len(micro_batches) / runtime.world_size)
        rank_sums = []  # (global micro-batch number, its stat sums)
        for slot in range(slots):
            # a rank short of micro-batches runs a zero-weight one, so every rank joins the gradient sync
            number, indices = mine[slot] if slot < len(mine) else (None, micro_batches[0][1])
            micro = experience.micro_batch(indices, self.pad_id, self.device)
            with runtime.no_sync(self.forward_model, sync=slot == slots - 1):
                with runtime.autocast():
                    out = self.forward_model(micro.batch, self.temperature, with_values=True)
                loss, micro_sums = step_loss_fn(out, micro, totals)
                finite_or_raise(loss.item(), f"{self.name} {phase + ' ' if phase else ''}loss (epoch {epoch + 1}, "
                                f"step {self.steps + 1})", "lower optim.lr or check the rewards")
                runtime.backward(loss if number is not None else loss * 0.0)
            if number is not None:
                rank_sums.append((number, {key: value.item() if torch.is_tensor(value) else float(value)
                                           for key, value in micro_sums.items()}))
        if runtime.distributed:
            rank_sums = sorted(item for shard in runtime.all_gather(rank_sums) for item in shard)
        return _combine(rank_sums, totals), totals


def _combine(rank_sums: list, totals: dict) -> dict:
    """The minibatch's stats from its micro-batches' sums in the global micro-batch order: sums / tokens, and the
    ``max_*`` stats combined by max."""
    sums: dict[str, float] = {}
    for _, micro_sums in rank_sums:
        for key, value in micro_sums.items():
            if key.startswith("max_"):  # maxima are combined by max, not summed
                sums[key] = max(sums.get(key, value), value)
            else:
                sums[key] = sums.get(key, 0.0) + value
    return {key: value if key.startswith("max_") else value / totals["tokens"] for key, value in sums.items()}


def value_only_loss(out, micro, totals, optim):
    """vf_coef · ½ agg((V − R)²) of one micro-batch (V, R: [B, T]) with optim.loss_aggregation: the critic warm-up's
    loss (weighted as in the policy phase, so that AdamW's moments carry over at the same scale)."""
    value_loss = 0.5 * (out.values - micro.returns) ** 2
    loss = optim.vf_coef * aggregate(value_loss, micro.mask, optim.loss_aggregation, total_tokens=totals["tokens"],
                                     total_sequences=totals["sequences"])
    return loss, {"value_loss": masked_sum(value_loss, micro.mask)}


def critic_warmup(model, experience, optimizer, trainable, runtime, optim, accumulate, generator,
                  epochs: int, name: str, log) -> dict:
    """``epochs`` passes of value-only steps before the first policy update (see ``minibatch_updates``); returns
    critic_warmup_steps and the value loss of the first and the last warm-up step."""
    critic = {id(p) for key, p in model.named_parameters()
              if key.startswith(("value_head.", "critic_backbone."))}  # after sharding: the shards
    peak = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, peak):
        group["lr"] = lr
    losses = []
    for epoch in range(epochs):
        for minibatch in split(generator.permutation(len(experience)).tolist(), optim.minibatch_size):
            stats, _ = accumulate(minibatch, lambda out, micro, totals: value_only_loss(out, micro, totals, optim),
                                  epoch, phase="critic warm-up")
            for p in trainable:
                if id(p) not in critic:
                    p.grad = None  # AdamW skips a parameter without a gradient: the policy does not move
            runtime.clip_and_step(optimizer, trainable, optim.max_grad_norm, lambda norm: finite_or_raise(
                norm, f"{name} critic warm-up gradient norm (epoch {epoch + 1})", "lower optim.lr"))
            losses.append(stats["value_loss"])
        log(f"{name} critic warm-up epoch {epoch + 1}/{epochs}: value_loss {losses[-1]:.4f}")
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    return {"critic_warmup_steps": len(losses), "critic_warmup_value_loss_first": losses[0],
            "critic_warmup_value_loss_last": losses[-1]}


def _spread(keep: list[bool], flags: list[bool]) -> list[bool]:
    """``keep`` (one flag per row where ``flags`` is true) spread over every row of ``flags`` (False elsewhere)."""
    kept = iter(keep)
    return [next(kept) if flag else False for flag in flags]


@torch.no_grad()
def refresh_advantages(forward_model, experience, params, runtime, *, pad_id: int, device, temperature: float) -> dict:
    """After the critic warm-up, the round's advantages as the advantages stage would have computed them with the
    warmed critic: its values V' on every response of the round (``Experience.whole_round``: the rows the update
    leaves out too, as the stage whitened over them), then A, R = ``advantages.gae_advantages`` of the stage's token
    rewards with V', kept for the trained rows.  V' also becomes the old values that the value loss clips around.
    Every rank computes every row, in the same order (under fsdp each forward is collective).  Shapes: ragged [T_i]
    per response in, and out, of ``experience``."""
    from rlhf_core.rl.advantages import gae_advantages

    whole, kept = experience.whole_round or (experience, [True] * len(experience))
    if whole.rewards is None:
        raise ValueError("the critic warm-up needs the round's token rewards (Experience.rewards)")
    values = [None] * len(whole)
    for indices in split(list(range(len(whole))), params.optim.micro_batch_size):
        micro = whole.micro_batch(indices, pad_id, device)
        with runtime.autocast():
            out = forward_model(micro.batch, temperature, with_values=True)
        for row, index in enumerate(indices):
            values[index] = out.values[row, :len(whole.response_ids[index])].float().cpu()
    rewards, mask = pad_sequences(whole.rewards)
    values_t, _ = pad_sequences(values)
    advantages, returns = gae_advantages(rewards, values_t, mask, params.advantages.gamma, params.advantages.lam,
                                         params.advantages.whiten_advantages)
    rows = [row for row, flag in enumerate(kept) if flag]
    lengths = [int(mask[row].sum()) for row in rows]
    old_values, trained_mask = pad_sequences(experience.old_values)  # the trained rows' width: the whole round's or less
    width = old_values.shape[1]
    values_t, advantages, returns = values_t[rows, :width], advantages[rows, :width], returns[rows, :width]
    moved = float(((values_t - old_values).abs() * trained_mask).sum() / trained_mask.sum())
    experience.old_values = [values_t[row, :n].tolist() for row, n in enumerate(lengths)]
    experience.advantages = [advantages[row, :n].tolist() for row, n in enumerate(lengths)]
    experience.returns = [returns[row, :n].tolist() for row, n in enumerate(lengths)]
    return {"critic_warmup_value_change": moved}
