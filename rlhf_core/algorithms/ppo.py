"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Huang et al. 2024).

One round of updates, every step visible:

    for epoch in 1..ppo.epochs:
        shuffle the round's responses, cut them into minibatches of ppo.minibatch_size
        for each minibatch:
            for each micro-batch of ppo.micro_batch_size (gradient accumulation):
                forward: log π_θ, entropy, V_θ   (same code and temperature as the rollout)
                loss = Σ_tokens [ L_clip + vf_coef · L_V − ent_coef · H ] / tokens_in_minibatch
                backward
            if approx-KL(π_old‖π_θ) of the minibatch > ppo.target_kl: drop the step, stop the round
            clip grad norm; AdamW step; LR schedule step

Peak memory is set by the micro-batch: each one is collated to its own longest prompt and response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rlhf_core.advantages import explained_variance, pad_sequences
from rlhf_core.losses import approx_kl, clipped_surrogate, clipped_value_loss, masked_sum
from rlhf_core.models import collate


@dataclass
class Experience:
    """The round's data, one entry per response (ragged token arrays)."""

    prompt_ids: list
    response_ids: list
    old_logprobs: list
    old_values: list
    advantages: list
    returns: list

    def __len__(self) -> int:
        return len(self.response_ids)

    def tensors(self, indices: list[int], pad_id: int, device):
        """Collate a micro-batch: the token batch plus [B, R] float tensors aligned with its response columns."""
        batch = collate([list(self.prompt_ids[i]) for i in indices], [list(self.response_ids[i]) for i in indices], pad_id)
        width = batch.response_mask.shape[1]

        def padded(arrays):
            values, _ = pad_sequences([arrays[i] for i in indices])
            if values.shape[1] < width:
                values = torch.nn.functional.pad(values, (0, width - values.shape[1]))
            return values.to(device)

        return (batch.to(device), padded(self.old_logprobs), padded(self.old_values), padded(self.advantages),
                padded(self.returns))


def train_ppo(model, experience: Experience, ppo, *, temperature: float, pad_id: int, device, seed: int,
              log=print) -> dict:
    """Run one round of PPO updates on ``model`` (an ActorCritic) in place; return the round's diagnostics."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ppo.lr, eps=ppo.adam_eps, weight_decay=ppo.weight_decay)
    minibatches_per_epoch = math.ceil(len(experience) / ppo.minibatch_size)
    total_steps = ppo.epochs * minibatches_per_epoch
    scheduler = get_scheduler(ppo.lr_schedule, optimizer, num_warmup_steps=ppo.warmup_steps,
                              num_training_steps=total_steps)
    generator = np.random.default_rng(seed)
    history: dict[str, list[float]] = {k: [] for k in (
        "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "value_clip_fraction", "ratio_mean",
        "ratio_max", "grad_norm", "learning_rate")}
    first_ratio_deviation, first_approx_kl = None, None
    early_stopped, steps = False, 0

    for epoch in range(ppo.epochs):
        order = generator.permutation(len(experience)).tolist()
        for start in range(0, len(order), ppo.minibatch_size):
            minibatch = order[start:start + ppo.minibatch_size]
            minibatch_tokens = float(sum(len(experience.response_ids[i]) for i in minibatch))
            sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                                  "value_clip_fraction", "ratio"), 0.0)
            ratio_max, ratio_deviation = 0.0, 0.0
            optimizer.zero_grad(set_to_none=True)
            for micro_start in range(0, len(minibatch), ppo.micro_batch_size):
                indices = minibatch[micro_start:micro_start + ppo.micro_batch_size]
                batch, old_logprobs, old_values, advantages, returns = experience.tensors(indices, pad_id, device)
                mask = batch.response_mask
                out = model(batch, temperature, with_values=True)
                pg_loss, ratio, clipped = clipped_surrogate(out.logprobs, old_logprobs, advantages, ppo.clip_range)
                vf_loss, vf_clipped = clipped_value_loss(out.values, old_values, returns, ppo.value_clip_range)
                loss = (masked_sum(pg_loss, mask) + ppo.vf_coef * masked_sum(vf_loss, mask)
                        - ppo.ent_coef * masked_sum(out.entropy, mask)) / minibatch_tokens
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO loss is {loss.item()} (epoch {epoch + 1}, step {steps + 1}); "
                                             "lower ppo.lr or check the rewards")
                loss.backward()
                with torch.no_grad():
                    sums["policy_loss"] += masked_sum(pg_loss, mask).item()
                    sums["value_loss"] += masked_sum(vf_loss, mask).item()
                    sums["entropy"] += masked_sum(out.entropy, mask).item()
                    sums["approx_kl"] += masked_sum(approx_kl(out.logprobs, old_logprobs), mask).item()
                    sums["clip_fraction"] += masked_sum(clipped, mask).item()
                    sums["value_clip_fraction"] += masked_sum(vf_clipped, mask).item()
                    sums["ratio"] += masked_sum(ratio, mask).item()
                    real = mask.bool()
                    ratio_max = max(ratio_max, ratio[real].max().item())
                    ratio_deviation = max(ratio_deviation, (ratio[real] - 1.0).abs().max().item())
            means = {k: v / minibatch_tokens for k, v in sums.items()}
            if first_ratio_deviation is None:  # on an unchanged policy: ratio 1 and approx-KL 0
                first_ratio_deviation, first_approx_kl = ratio_deviation, means["approx_kl"]
            if ppo.target_kl is not None and means["approx_kl"] > ppo.target_kl:
                log(f"ppo: early stop at epoch {epoch + 1}, step {steps + 1}: approx-KL {means['approx_kl']:.4f} > "
                    f"target_kl {ppo.target_kl}")
                optimizer.zero_grad(set_to_none=True)
                early_stopped = True
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(params, ppo.max_grad_norm).item()
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"PPO gradient norm is {grad_norm} (epoch {epoch + 1}); lower ppo.lr")
            history["learning_rate"].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            steps += 1
            for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "value_clip_fraction"):
                history[key].append(means[key])
            history["ratio_mean"].append(means["ratio"])
            history["ratio_max"].append(ratio_max)
            history["grad_norm"].append(grad_norm)
        log(f"ppo epoch {epoch + 1}/{ppo.epochs}: " + ", ".join(
            f"{k} {np.mean(v[-minibatches_per_epoch:]):.4f}" for k, v in history.items() if v))
        if early_stopped:
            break

    metrics = {key: float(np.mean(values)) for key, values in history.items() if values}
    metrics["ratio_max"] = float(max(history["ratio_max"])) if history["ratio_max"] else 1.0
    metrics.update({
        "optimizer_steps": steps,
        "planned_steps": total_steps,
        "early_stopped": early_stopped,
        "first_minibatch_ratio_max_deviation": float(first_ratio_deviation or 0.0),
        "first_minibatch_approx_kl": float(first_approx_kl or 0.0),
    })
    return metrics


def old_value_explained_variance(experience: Experience) -> float:
    """How well the rollout's values V_old predicted the returns: 1 − Var[R − V_old] / Var[R]."""
    values, mask = pad_sequences(experience.old_values)
    returns, _ = pad_sequences(experience.returns)
    return explained_variance(values, returns, mask)
