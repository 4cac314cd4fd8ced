import math

import pytest
import torch

from rlhf_core.rl.trust_region import (
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    flat_concat,
    params_to_vector,
    vector_to_params,
)


def test_conjugate_gradient_solves_a_random_spd_system():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    a = q.T @ q + torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v

    x, residual_sq, iterations = conjugate_gradient(matvec, b, iters=100, residual_tol=1e-20)
    expected = torch.linalg.solve(a, b)
    assert torch.allclose(x, expected, rtol=1e-8, atol=1e-8)
    assert residual_sq < 1e-20
    assert iterations == len(calls) <= 40  # exact arithmetic needs ≤ 20; a little slack for rounding
    assert torch.allclose(a @ x, b, atol=1e-9)


def test_conjugate_gradient_stops_at_iters_and_at_zero_rhs():
    a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    b = torch.ones(10, dtype=torch.float64)
    x, residual_sq, iterations = conjugate_gradient(lambda v: a @ v, b, iters=3, residual_tol=1e-30)
    assert iterations == 3 and residual_sq > 1e-30
    # the residual it reports is the true one of the returned x
    assert residual_sq == pytest.approx(float(((b - a @ x) ** 2).sum()), rel=1e-6)
    x, residual_sq, iterations = conjugate_gradient(lambda v: a @ v, torch.zeros(10, dtype=torch.float64), 5, 1e-10)
    assert iterations == 0 and residual_sq == 0.0 and torch.equal(x, torch.zeros(10, dtype=torch.float64))


def test_vector_param_round_trip_is_exact_and_in_place():
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen)),
              torch.nn.Parameter(torch.randn(2, 1, 3, generator=gen))]
    originals = [p.detach().clone() for p in params]
    pointers = [p.data_ptr() for p in params]
    vector = params_to_vector(params)
    assert vector.shape == (12 + 5 + 6,)
    assert torch.equal(vector, flat_concat(originals))
    vector_to_params(vector + 1.0, params)  # the copy is independent of the parameters
    assert torch.equal(params[1].detach(), originals[1] + 1.0)
    vector_to_params(vector, params)
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, originals))
    assert [p.data_ptr() for p in params] == pointers
    with pytest.raises(ValueError):
        vector_to_params(vector[:-1], params)


def test_categorical_kl_matches_a_hand_computed_value():
    old = torch.tensor([[[0.0, math.log(2.0)], [5.0, -3.0]]])  # p = [1/3, 2/3]; the second token is masked
    new = torch.tensor([[[0.0, 0.0], [0.0, 9.0]]])  # q = [1/2, 1/2]
    mask = torch.tensor([[1.0, 0.0]])
    expected = (1 / 3) * math.log((1 / 3) / (1 / 2)) + (2 / 3) * math.log((2 / 3) / (1 / 2))
    assert categorical_kl(old, new, mask).item() == pytest.approx(expected, rel=1e-6)
    assert categorical_kl(old, old, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-7)
    # a shift of the logits changes nothing; two unmasked tokens are summed
    both = categorical_kl(old + 3.0, new - 1.0, torch.ones(1, 2)).item()
    p2, q2 = torch.softmax(old[0, 1], -1), torch.softmax(new[0, 1], -1)
    assert both == pytest.approx(expected + float((p2 * (p2.log() - q2.log())).sum()), rel=1e-5)


def softmax_policy(states=6, features=3, actions=4):
    """A linear softmax policy: logits_s = x_sᵀ W, W: [features, actions]."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(states, features, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(features, actions, generator=gen, dtype=torch.float64))
    return x, w


def explicit_fisher(x, w):
    """F = (1/S) Σ_s J_sᵀ (diag p_s − p_s p_sᵀ) J_s, J_s = ∂logits_s/∂vec(W) = x_sᵀ ⊗ I_A."""
    states, actions = x.shape[0], w.shape[1]
    fisher = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(x @ w, -1)
        for s in range(states):
            jac = torch.kron(x[s][None, :], torch.eye(actions, dtype=torch.float64))  # [A, F·A]
            p = probs[s]
            fisher += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return fisher / states


def test_fisher_vector_product_matches_the_explicit_fisher():
    x, w = softmax_policy()
    fisher = explicit_fisher(x, w)
    mask = torch.ones(x.shape[0], dtype=torch.float64)

    def mean_kl():
        logits = x @ w
        return categorical_kl(logits.detach(), logits, mask) / x.shape[0]

    gen = torch.Generator().manual_seed(3)
    for damping in (0.0, 0.1):
        v = torch.randn(w.numel(), generator=gen, dtype=torch.float64)
        product = fisher_vector_product(mean_kl, [w], v, damping)
        assert torch.allclose(product, fisher @ v + damping * v, rtol=1e-10, atol=1e-12)

    # the same Hessian from autograd.functional.hessian of KL(π_old ‖ π_W) with π_old fixed at W_old
    old_logits = (x @ w).detach()
    hessian = torch.autograd.functional.hessian(
        lambda flat: categorical_kl(old_logits, x @ flat.view_as(w), mask) / x.shape[0], w.detach().reshape(-1))
    assert torch.allclose(hessian, fisher, atol=1e-12)


def test_fisher_vector_product_accumulates_over_micro_batches():
    x, w = softmax_policy(states=7)
    mask = torch.ones(7, dtype=torch.float64)

    def part(rows):
        def kl():
            logits = x[rows] @ w
            return categorical_kl(logits.detach(), logits, mask[rows]) / 7
        return kl

    v = torch.randn(w.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = fisher_vector_product(part(slice(0, 7)), [w], v, 0.05)
    pieces = fisher_vector_product([part(slice(0, 3)), part(slice(3, 5)), part(slice(5, 7))], [w], v, 0.05)
    assert torch.allclose(whole, pieces, rtol=1e-12, atol=1e-14)
    assert torch.allclose(whole, explicit_fisher(x, w) @ v + 0.05 * v, rtol=1e-10, atol=1e-12)
    assert w.grad is None  # products go through autograd.grad, never into .grad


def test_fisher_vector_product_gives_zeros_for_unreached_parameters():
    x, w = softmax_policy()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    mask = torch.ones(x.shape[0], dtype=torch.float64)

    def mean_kl():
        logits = x @ w
        return categorical_kl(logits.detach(), logits, mask) / x.shape[0]

    v = torch.ones(w.numel() + 3, dtype=torch.float64)
    product = fisher_vector_product(mean_kl, [w, unused], v, 0.5)
    assert torch.allclose(product[-3:], torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.allclose(product[:-3], explicit_fisher(x, w) @ v[:-3] + 0.5 * v[:-3], atol=1e-12)


def test_cg_on_the_fisher_recovers_the_natural_gradient():
    x, w = softmax_policy()
    fisher = explicit_fisher(x, w)
    mask = torch.ones(x.shape[0], dtype=torch.float64)

    def mean_kl():
        logits = x @ w
        return categorical_kl(logits.detach(), logits, mask) / x.shape[0]

    g = torch.randn(w.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    damping = 0.1
    s, _, _ = conjugate_gradient(lambda v: fisher_vector_product(mean_kl, [w], v, damping), g, 50, 1e-24)
    expected = torch.linalg.solve(fisher + damping * torch.eye(w.numel(), dtype=torch.float64), g)
    assert torch.allclose(s, expected, rtol=1e-7, atol=1e-9)
