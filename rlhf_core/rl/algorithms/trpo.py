"""TRPO and the natural policy gradient for language models (Kakade 2001; Schulman et al. 2015).

One round of updates, every step visible:

    θ: the policy's trainable parameters (all, or the last trpo.trainable_last_n_blocks blocks + final
       norm + LM head); the critic is fitted separately afterwards.
    for step in 1..trpo.steps:                       (each step on the full round's data)
        θ_old ← θ
        for each micro-batch of optim.micro_batch_size:
            forward at θ_old: logits (÷ temperature), log π_θ_old, entropy
            L(θ)  = (1/N) Σ_tokens ρ_t A_t,   ρ_t = exp(log π_θ(a_t|s_t) − log π_rollout(a_t|s_t))
            g    += ∇_θ L_micro(θ_old)                                   (accumulated over micro-batches)
            cache the detached logits at θ_old                           (π_old of the trust region)
        KL̄(θ) = (1/N) Σ_tokens KL(π_old(·|s_t) ‖ π_θ(·|s_t))            exact, over the vocabulary
        F·v   = ∇((∇KL̄)ᵀ v) at θ_old, micro-batch by micro-batch        (never an explicit matrix)
        s     = CG(F + λI, g)                                            (trpo.cg_iters, cg_damping)
        Δ     = sqrt(2δ / sᵀFs) · s                                      (δ = trpo.max_kl: ½ΔᵀFΔ = δ)
        trpo: for k = 0..max_backtracks: θ = θ_old + β^k Δ (β = backtrack_fraction);
              accept the first with L(θ) − L(θ_old) > 0 and KL̄(θ) ≤ δ;
              none accepted: θ ← θ_old exactly, no update
        npg:  θ = θ_old + Δ, no line search
    critic: trpo.critic_epochs passes of Adam (trpo.critic_lr) over shuffled minibatches of
            optim.minibatch_size responses, micro-batched, on L_V = (1/N_mb) Σ_tokens ½ (V(s_t) − R_t)².
            With a value head on the policy's backbone the backbone runs without gradients, so
            only the value head changes.

N is the number of response tokens in the round (token-mean aggregation).  The ratio ρ is taken
against the rollout's log-probs (the behaviour policy), so L(θ_old) = mean A_t on the first step; the
trust region is around the parameters at the start of each step.

Memory: the θ_old logits of the whole round, [tokens × vocabulary] float32, are kept on ``device`` for
the line search's KL; each Fisher-vector product runs one micro-batch forward + double backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlhf_core.model.forward import response_logits, token_logprobs
from rlhf_core.rl.algorithms.common import Experience, critic_parameters, finite_or_raise, policy_parameters, split
from rlhf_core.rl.trust_region import (
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    flat_concat,
    params_to_vector,
    vector_to_params,
)


def policy_forward(model, batch, temperature: float):
    """The same forward path as ``ActorCritic``: (logits ÷ T [B,R,V] float32, log π(a_t) [B,R], entropy [B,R])."""
    logits, _ = response_logits(model.policy, batch)
    logprobs, entropy = token_logprobs(logits, batch.response_ids, temperature)
    return logits.float() / temperature, logprobs, entropy


def surrogate_sum(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Σ_tokens ρ_t A_t with ρ_t = exp(log π_θ − log π_old).  [B,R] x3, mask [B,R] -> scalar."""
    return (torch.exp(logprobs - old_logprobs) * advantages * mask).sum()


def critic_values(model, batch) -> torch.Tensor:
    """V(s_t) [B,R] with gradients only into the critic's own parameters.

    A value head on the policy's backbone reads the backbone's last hidden states computed without
    gradients, so the policy is neither changed nor given a .grad.
    """
    if model.critic_backbone is None:
        with torch.no_grad():
            _, hidden = response_logits(model.policy, batch, output_hidden=True)
        return model.value_head(hidden.detach())
    out = model.critic_backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False)
    return model.value_head(batch.gather_response(out.last_hidden_state[:, -(batch.response_width + 1):, :]))


@torch.no_grad()
def round_value_loss(model, micro_batches) -> float:
    """(1/N) Σ_tokens ½ (V(s_t) − R_t)² over the round, without gradients."""
    total, tokens = 0.0, 0.0
    for mb in micro_batches:
        values = critic_values(model, mb.batch)
        total += (0.5 * (values - mb.returns) ** 2 * mb.mask).sum().item()
        tokens += mb.mask.sum().item()
    return total / max(tokens, 1.0)


def train_trpo(model, experience: Experience, params, *, temperature: float, pad_id: int, device, seed: int,
               log=print, line_search: bool = True, name: str = "trpo") -> dict:
    """One round of TRPO (``line_search``: backtrack until the KL bound and the improvement hold) or NPG (no line
    search: the full natural step) on ``model`` in place; ``name`` labels the log lines.

    Returns flat metrics; with trpo.steps > 1 the per-step values are averaged over the steps:

        step_size              |θ_new − θ_old| of the applied step (β^k·|Δ|; 0 when rejected)
        full_step_norm         |Δ|, the δ-normalised natural step before any backtracking
        kl_after_step          measured KL̄(θ_new) per token (0 when rejected)
        predicted_kl           ½ (β^k Δ)ᵀ F (β^k Δ) of the applied step (0 when rejected)
        backtracks             rejected line-search candidates (max_backtracks + 1 when none accepted; 0 for npg)
        cg_residual            squared residual rᵀr that conjugate gradient stopped at
        cg_iterations          Fisher-vector products made by conjugate gradient
        surrogate_improvement  L(θ_new) − L(θ_old) (0 when rejected)
        expected_improvement   gᵀ(θ_new − θ_old), its first-order prediction
        accepted               bool for one step; the fraction of accepted steps for several
        accepted_steps         number of steps that changed the policy
        policy_grad_norm       |g|
        entropy                token-mean entropy of π at the start of the round (temperature-scaled)
        value_loss_before_fit  token-mean ½(V − R)² over the round before the critic's regression
        value_loss             the same after it
    """
    trainable = [p.requires_grad for p in model.parameters()]  # all, or the LoRA adapters and the critic
    try:
        return _train_round(model, experience, params, temperature=temperature, pad_id=pad_id, device=device,
                            seed=seed, log=log, line_search=line_search, algorithm=name)
    finally:
        for p, flag in zip(model.parameters(), trainable):  # policy_parameters froze the blocks it did not choose
            p.requires_grad_(flag)


@dataclass
class _Round:
    """What every step of a round reads: the policy's parameters θ, the round's micro-batches (similar lengths,
    least padding) and N, the tokens in the round."""

    model: object
    theta: list
    micro_batches: list
    total_tokens: float
    temperature: float
    algorithm: str

    def surrogate_gradient(self, step: int):
        """Step 1: g = ∇L(θ_old), L = Σ_t ρ_t A_t / N, accumulated over the micro-batches; returns (g, L(θ_old),
        token-mean entropy, π_old's logits per micro-batch, cached for the KL of the line search)."""
        g = torch.zeros(sum(p.numel() for p in self.theta), device=self.theta[0].device)
        surrogate_old, entropy_sum, cached_old_logits = 0.0, 0.0, []
        for mb in self.micro_batches:
            logits, logprobs, entropy = policy_forward(self.model, mb.batch, self.temperature)
            micro_sum = surrogate_sum(logprobs, mb.old_logprobs, mb.advantages, mb.mask)
            loss = micro_sum / self.total_tokens
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.algorithm} surrogate is {loss.item()} (step {step + 1}); "
                                         "check the advantages and the old log-probs")
            grads = torch.autograd.grad(loss, self.theta, allow_unused=True)
            g += flat_concat([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, self.theta)])
            surrogate_old += micro_sum.item()  # summed as evaluate() sums, so L(θ_old) is comparable
            entropy_sum += (entropy.detach() * mb.mask).sum().item()
            cached_old_logits.append(logits.detach())
        return g, surrogate_old / self.total_tokens, entropy_sum / self.total_tokens, cached_old_logits

    def fisher_vector_product(self, damping: float):
        """v ↦ (F + damping·I)·v, F the Fisher of KL̄(π_θ_old ‖ π_θ) at θ_old (double backprop, no explicit F); a
        second argument replaces the damping (sᵀFs takes 0)."""
        def kl_closure(mb):
            def kl_at_theta_old():  # KL(π_θ_old ‖ π_θ) with π_θ_old the detached copy of this very forward
                with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
                    logits, _, _ = policy_forward(self.model, mb.batch, self.temperature)
                return categorical_kl(logits.detach(), logits, mb.mask) / self.total_tokens
            return kl_at_theta_old

        kl_fns = [kl_closure(mb) for mb in self.micro_batches]

        def fvp(v, damping: float = damping):
            return fisher_vector_product(kl_fns, self.theta, v, damping)
        return fvp

    def evaluate(self, cached_old_logits) -> tuple[float, float]:
        """(L(θ), KL̄(θ)) at the current parameters, no gradients."""
        surrogate, kl = 0.0, 0.0
        with torch.no_grad():
            for mb, old_logits in zip(self.micro_batches, cached_old_logits):
                logits, logprobs, _ = policy_forward(self.model, mb.batch, self.temperature)
                surrogate += surrogate_sum(logprobs, mb.old_logprobs, mb.advantages, mb.mask).item()
                kl += categorical_kl(old_logits, logits, mb.mask).item()
        return surrogate / self.total_tokens, kl / self.total_tokens


def _natural_step(round_: _Round, g, trpo, grad_norm: float, record: dict):
    """Steps 2–3: s = (F + λI)⁻¹ g by conjugate gradient, then the δ-normalised full step Δ = sqrt(2δ / sᵀFs)·s;
    None when there is nothing to step along (no gradient, e.g. all advantages 0)."""
    if grad_norm <= 0.0:
        return None
    fvp = round_.fisher_vector_product(trpo.cg_damping)
    s, cg_residual, cg_iterations = conjugate_gradient(fvp, g, trpo.cg_iters, trpo.cg_residual_tol)
    finite_or_raise(s.norm().item(), f"{round_.algorithm} conjugate-gradient solution norm", "raise trpo.cg_damping")
    record.update(cg_residual=cg_residual, cg_iterations=cg_iterations)
    s_f_s = finite_or_raise(torch.dot(s, fvp(s, 0.0)).item(), f"{round_.algorithm} sᵀFs", "raise trpo.cg_damping")
    if s_f_s <= 0.0:
        return None
    return math.sqrt(2.0 * trpo.max_kl / s_f_s) * s


def _line_search(round_: _Round, theta_old, full_step, g, surrogate_old: float, cached_old_logits, trpo,
                 line_search: bool, step: int, record: dict, log) -> bool:
    """Step 4: θ_old + β^k Δ for k = 0, 1, … until the surrogate improves and KL̄ ≤ δ (trpo), or the full step
    alone (npg); no accepted candidate restores θ_old bit for bit.  Fills ``record``; returns whether it stepped."""
    delta = trpo.max_kl
    record["full_step_norm"] = full_step.norm().item()
    fractions = [trpo.backtrack_fraction ** k for k in range(trpo.max_backtracks + 1)]
    if not line_search:
        fractions = fractions[:1]
    for k, fraction in enumerate(fractions):
        vector_to_params(theta_old + fraction * full_step, round_.theta)
        surrogate_new, kl_new = round_.evaluate(cached_old_logits)
        improvement = surrogate_new - surrogate_old
        if not line_search or (improvement > 0.0 and kl_new <= delta):
            record.update(step_size=fraction * record["full_step_norm"], kl_after_step=kl_new,
                          predicted_kl=fraction ** 2 * delta, backtracks=k, surrogate_improvement=improvement,
                          expected_improvement=fraction * torch.dot(g, full_step).item(), accepted=1.0)
            break
        log(f"{round_.algorithm} step {step + 1}: candidate {k} rejected (surrogate change {improvement:.3e}, "
            f"KL {kl_new:.3e} vs δ {delta})")
    else:
        vector_to_params(theta_old, round_.theta)  # bit for bit: the copy of the exact old values
        record["backtracks"] = len(fractions)
    if not (math.isfinite(record["kl_after_step"]) and math.isfinite(record["surrogate_improvement"])):
        vector_to_params(theta_old, round_.theta)  # npg: do not leave the policy at a non-finite step
        raise FloatingPointError(f"{round_.algorithm} KL after the step is {record['kl_after_step']} and the "
                                 f"surrogate change {record['surrogate_improvement']}; lower trpo.max_kl")
    return record["accepted"] == 1.0


def _fit_critic(model, experience: Experience, params, round_: _Round, *, pad_id, device, seed, log) -> tuple:
    """Step 5: value regression ½(V − R)² on the returns over trpo.critic_epochs, with the critic's own Adam at
    trpo.critic_lr; returns the round's value loss before and after."""
    trpo, algorithm, micro = params.trpo, round_.algorithm, params.optim.micro_batch_size
    critic = critic_parameters(model)
    value_loss_before = finite_or_raise(round_value_loss(model, round_.micro_batches), f"{algorithm} value loss",
                                        "check the returns")
    optimizer = torch.optim.Adam(critic, lr=trpo.critic_lr)
    generator = np.random.default_rng(seed)
    for epoch in range(trpo.critic_epochs):
        order = generator.permutation(len(experience)).tolist()
        epoch_loss = []
        for minibatch in split(order, params.optim.minibatch_size):
            minibatch_tokens = float(experience.tokens(minibatch))
            if minibatch_tokens == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for indices in split(minibatch, micro):
                mb = experience.micro_batch(indices, pad_id, device)
                values = critic_values(model, mb.batch)
                loss = (0.5 * (values - mb.returns) ** 2 * mb.mask).sum() / minibatch_tokens
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{algorithm} value loss is {loss.item()} (critic epoch {epoch + 1}); "
                                             "lower trpo.critic_lr or check the returns")
                loss.backward()
                loss_sum += loss.item()
            critic_grad_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in critic if p.grad is not None))
            finite_or_raise(critic_grad_norm, f"{algorithm} critic gradient norm", "lower trpo.critic_lr")
            optimizer.step()
            epoch_loss.append(loss_sum)
        log(f"{algorithm} critic epoch {epoch + 1}/{trpo.critic_epochs}: value loss {np.mean(epoch_loss):.4f}")
    optimizer.zero_grad(set_to_none=True)
    value_loss_after = finite_or_raise(round_value_loss(model, round_.micro_batches), f"{algorithm} value loss",
                                       "lower trpo.critic_lr or check the returns")
    return value_loss_before, value_loss_after


HISTORY = ("step_size", "full_step_norm", "kl_after_step", "predicted_kl", "backtracks", "cg_residual", "cg_iterations",
           "surrogate_improvement", "expected_improvement", "accepted", "policy_grad_norm")


def _train_round(model, experience: Experience, params, *, temperature, pad_id, device, seed, log, line_search: bool,
                 algorithm: str) -> dict:
    trpo = params.trpo
    theta = policy_parameters(model, trpo.trainable_last_n_blocks)
    for p in theta:
        p.requires_grad_(True)
    round_order = list(range(len(experience)))  # the whole round, cut into micro-batches of similar length
    micro_batches = [experience.micro_batch(indices, pad_id, device)
                     for indices in experience.length_groups(round_order, params.optim.micro_batch_size)]
    total_tokens = float(experience.tokens(round_order))
    if total_tokens == 0:
        raise ValueError("train_trpo: the round has no response tokens")
    round_ = _Round(model, theta, micro_batches, total_tokens, temperature, algorithm)
    history: dict[str, list[float]] = {key: [] for key in HISTORY}
    entropy_start = None
    for step in range(trpo.steps):
        g, surrogate_old, entropy, cached_old_logits = round_.surrogate_gradient(step)  # 1. g at θ_old
        grad_norm = finite_or_raise(g.norm().item(), f"{algorithm} policy gradient norm",
                                    "check the advantages and the old log-probs")
        entropy_start = entropy if entropy_start is None else entropy_start
        record = dict.fromkeys(history, 0.0)
        record["policy_grad_norm"] = grad_norm
        full_step = _natural_step(round_, g, trpo, grad_norm, record)  # 2–3. CG direction, δ-normalised step
        theta_old = params_to_vector(theta)
        if full_step is None:
            log(f"{algorithm} step {step + 1}/{trpo.steps}: zero natural gradient, no update")
            record["backtracks"] = trpo.max_backtracks + 1 if line_search else 0
        else:  # 4. line search (trpo) or the full step (npg)
            accepted = _line_search(round_, theta_old, full_step, g, surrogate_old, cached_old_logits, trpo,
                                    line_search, step, record, log)
            log(f"{algorithm} step {step + 1}/{trpo.steps}: accepted {accepted}, backtracks "
                f"{int(record['backtracks'])}, |g| {grad_norm:.3e}, cg rᵀr {record['cg_residual']:.2e} "
                f"({int(record['cg_iterations'])} it), step {record['step_size']:.3e}, "
                f"KL {record['kl_after_step']:.3e}, surrogate +{record['surrogate_improvement']:.3e}")
        for key, value in record.items():
            history[key].append(float(value))
    value_loss_before, value_loss_after = _fit_critic(model, experience, params, round_, pad_id=pad_id,  # 5. critic
                                                      device=device, seed=seed, log=log)
    metrics = {key: float(np.mean(values)) for key, values in history.items()}
    accepted_steps = int(sum(history["accepted"]))
    metrics["accepted"] = bool(accepted_steps == 1) if trpo.steps == 1 else accepted_steps / trpo.steps
    metrics["accepted_steps"] = accepted_steps
    if trpo.steps == 1:
        metrics["backtracks"] = int(history["backtracks"][0])
        metrics["cg_iterations"] = int(history["cg_iterations"][0])
    metrics.update(entropy=float(entropy_start), value_loss_before_fit=value_loss_before, value_loss=value_loss_after)
    return metrics
