"""Trust-region math for TRPO and the natural policy gradient.  Imports only torch.

Notation (Schulman et al. 2015, "Trust Region Policy Optimization"; Kakade 2001):

    θ ∈ R^n                      the flattened policy parameters
    g = ∇_θ L(θ)|θ_old            gradient of the surrogate objective
    KL̄(θ) = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t))      has KL̄(θ_old) = 0 and ∇KL̄(θ_old) = 0
    F = ∇²_θ KL̄(θ)|θ_old          its Hessian at θ_old = the Fisher information of π_θ
    s ≈ (F + λI)⁻¹ g              by conjugate gradient, using only products F·v
    Δ = sqrt(2δ / sᵀFs) · s       the step whose quadratic KL model ½ΔᵀFΔ equals δ

Nothing here builds F: every product F·v is two automatic differentiations (Pearlmutter 1994).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# Flat vectors <-> parameter lists


def flat_concat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors of any shapes into one vector: [n_1], …, [n_k] (any shapes) -> [Σ n_i].

    Gradients flow through (no detach), so it can flatten a list of first-order gradients that are
    differentiated again.
    """
    return torch.cat([t.reshape(-1) for t in tensors])


def params_to_vector(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ = [vec(p_1); …; vec(p_k)]: a detached *copy* of the parameters as one vector [Σ numel(p_i)].

    Writing it back with ``vector_to_params`` restores the parameters bit for bit.
    """
    return flat_concat([p.detach() for p in params]).clone()


@torch.no_grad()
def vector_to_params(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """p_i ← reshape(θ[o_i : o_i + numel(p_i)], shape(p_i)) for every i, in place (the tensors keep their
    identity and storage; optimizers and tied weights still see them).  vector: [Σ numel(p_i)].
    """
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} elements, the parameters {total}")
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(vector[offset:offset + n].view_as(p))
        offset += n


# ---------------------------------------------------------------------------------------------------
# Conjugate gradient


@torch.no_grad()
def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
                       residual_tol: float) -> tuple[torch.Tensor, float, int]:
    """Solve A x = b for symmetric positive-definite A, given only v ↦ A v (Hestenes & Stiefel 1952).

        x_0 = 0,  r_0 = b,  p_0 = b
        α_k = r_kᵀr_k / p_kᵀA p_k
        x_{k+1} = x_k + α_k p_k,   r_{k+1} = r_k − α_k A p_k
        β_k = r_{k+1}ᵀr_{k+1} / r_kᵀr_k,   p_{k+1} = r_{k+1} + β_k p_k

    stopping after ``iters`` products or as soon as rᵀr < ``residual_tol``.  ``matvec`` is called under
    ``torch.no_grad`` here; it may enable gradients itself (a Fisher-vector product does).

    b: [n].  Returns (x [n], rᵀr of the returned x as a float, number of matvec calls made).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    iterations = 0
    while iterations < iters and rr.item() >= residual_tol:
        with torch.enable_grad():
            ap = matvec(p)
        ap = ap.detach()
        p_ap = torch.dot(p, ap)
        if p_ap.item() <= 0.0:  # A not positive definite along p (or p = 0): stop with what we have
            break
        alpha = rr / p_ap
        x += alpha * p
        r -= alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        iterations += 1
    return x, float(rr.item()), iterations


# ---------------------------------------------------------------------------------------------------
# Fisher-vector products


def fisher_vector_product(kl_fn, params: Sequence[torch.Tensor], vector: torch.Tensor,
                          damping: float) -> torch.Tensor:
    """(F + λI)·v with F = ∇²KL̄(θ)|θ_old, by differentiating the KL twice (Pearlmutter's trick):

        F·v = ∇_θ ( (∇_θ KL̄(θ))ᵀ v )        (v held constant)

    ``kl_fn`` is either one closure returning the scalar KL̄(θ), or a sequence of closures whose values
    *sum* to KL̄ (e.g. one per micro-batch, each already divided by the round's token count); they are
    differentiated one at a time, so only one micro-batch's graph is alive at once, and

        F·v = Σ_j ∇_θ ((∇_θ KL̄_j)ᵀ v).

    Each closure must build its graph at the current θ; for the Hessian to be the Fisher, the KL must
    be taken at θ = θ_old (value and gradient 0), e.g. ``categorical_kl(logits.detach(), logits, mask)``.
    Parameters a closure does not reach contribute zeros.

    params: k tensors with requires_grad; vector: [Σ numel(p_i)] (detached).  Returns [Σ numel(p_i)].
    """
    closures = [kl_fn] if callable(kl_fn) else list(kl_fn)
    vector = vector.detach()
    product = torch.zeros_like(vector)
    for closure in closures:
        with torch.enable_grad():
            kl = closure()
            grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
            flat_grad = flat_concat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
            grad_dot_v = torch.dot(flat_grad, vector)
            if not grad_dot_v.requires_grad:  # this closure does not depend on params
                continue
            hvp = torch.autograd.grad(grad_dot_v, params, allow_unused=True)
        product += flat_concat([torch.zeros_like(p) if h is None else h for h, p in zip(hvp, params)]).detach()
    return product + damping * vector


# ---------------------------------------------------------------------------------------------------
# The exact KL of categorical distributions


def categorical_kl(old_logits: torch.Tensor, new_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{b,t} mask_bt · KL(softmax(old_bt) ‖ softmax(new_bt)), the exact KL over the vocabulary:

        KL_bt = Σ_v p_old(v) · (log p_old(v) − log p_new(v)),   p = softmax(logits)

    Logits must already be divided by the sampling temperature.  Computed in float32 (or float64 if
    given).  The caller divides by the token count.  old_logits, new_logits: [..., V]; mask: [...]
    (float, 1 for real tokens).  Returns a scalar; differentiable in both logits.
    """
    dtype = torch.promote_types(new_logits.dtype, torch.float32)
    old_logp = torch.log_softmax(old_logits.to(dtype), dim=-1)
    new_logp = torch.log_softmax(new_logits.to(dtype), dim=-1)
    per_token = (old_logp.exp() * (old_logp - new_logp)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum()
