"""Unit tests of rlhf_core.rl.kl: the k1/k2/k3 estimators and the KL-coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.rl.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_estimators_on_hand_worked_numbers():
    # π(a) = 0.5, π_ref(a) = 0.25  ->  r = π_ref/π = 0.5
    logp, ref = _t(math.log(0.5)), _t(math.log(0.25))
    # k1 = log π − log π_ref = log 0.5 − log 0.25 = log 2
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2.0), abs=1e-12)
    # k2 = ½ (log r)² = ½ (log 0.5)² = 0.2402265...
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(0.5) ** 2, abs=1e-12)
    assert kl_k2(logp, ref).item() == pytest.approx(0.24022650695910071, abs=1e-12)
    # k3 = (r − 1) − log r = (0.5 − 1) − log 0.5 = −0.5 + 0.6931... = 0.1931...
    assert kl_k3(logp, ref).item() == pytest.approx((0.5 - 1.0) - math.log(0.5), abs=1e-12)
    assert kl_k3(logp, ref).item() == pytest.approx(0.19314718055994530, abs=1e-12)


def test_estimators_the_other_way_round():
    # π(a) = 0.25, π_ref(a) = 0.5  ->  r = 2: k1 = −log 2 (negative per sample), k3 = 1 − log 2
    logp, ref = _t(math.log(0.25)), _t(math.log(0.5))
    assert kl_k1(logp, ref).item() == pytest.approx(-math.log(2.0), abs=1e-12)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2.0) ** 2, abs=1e-12)
    assert kl_k3(logp, ref).item() == pytest.approx(1.0 - math.log(2.0), abs=1e-12)


def test_all_estimators_are_zero_when_policies_agree():
    logp = _t(-0.1, -2.0, -7.5)
    for name in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(name, logp, logp.clone()), torch.zeros(3, dtype=torch.float64))


def test_elementwise_shapes_are_kept():
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    ref = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    for name, fn in KL_ESTIMATORS.items():
        out = kl_estimate(name, logp, ref)
        assert out.shape == (3, 5)
        assert torch.equal(out, fn(logp, ref))
    assert torch.allclose(kl_k1(logp, ref), logp - ref)


def test_k2_and_k3_are_non_negative_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3.0
    ref = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3.0
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k2(logp, ref) >= 0).all()
    # k1 is not: it takes both signs on random inputs
    k1 = kl_k1(logp, ref)
    assert (k1 < 0).any() and (k1 > 0).any()


def test_k3_is_clamped_against_overflow():
    # log r = 50 would overflow exp() in float32; the log-ratio is clamped to ±20
    logp, ref = torch.tensor([0.0, 0.0]), torch.tensor([50.0, -50.0])
    out = kl_k3(logp, ref)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-5)
    assert out[1].item() == pytest.approx(math.expm1(-20.0) + 20.0, rel=1e-6)


def test_k1_and_k3_means_converge_to_exact_kl_of_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # KL(p‖q) = 0.2332...
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3), abs=1e-12)

    gen = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    logp, ref = p.log()[samples], q.log()[samples]
    k1_mean = kl_k1(logp, ref).mean().item()
    k3_mean = kl_k3(logp, ref).mean().item()
    k2_mean = kl_k2(logp, ref).mean().item()
    assert k1_mean == pytest.approx(exact, abs=0.01)
    assert k3_mean == pytest.approx(exact, abs=0.01)
    # k2 is biased: its expectation is ½ E_p[(log q/p)²] = 0.2545..., not the KL
    expected_k2 = float((p * 0.5 * (q / p).log() ** 2).sum())
    assert k2_mean == pytest.approx(expected_k2, abs=0.01)
    assert abs(expected_k2 - exact) > 0.015


def test_kl_estimate_rejects_unknown_name():
    with pytest.raises(KeyError):
        kl_estimate("k4", torch.zeros(1), torch.zeros(1))


def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    assert ctl.value == 0.05
    for kl in (0.0, 3.0, 100.0, -5.0):
        assert ctl.update(kl, 1000) == 0.05
    assert ctl.value == 0.05


def test_adaptive_controller_matches_hand_worked_updates():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL = 6.6: e = 6.6/6 − 1 = 0.1 (inside the clip); β = 0.1 · (1 + 0.1 · 100/10000) = 0.1 · 1.001 = 0.1001
    assert ctl.update(6.6, 100) == pytest.approx(0.1001, rel=1e-12)
    # KL = 9: e = 0.5 -> clipped to +0.2; β = 0.1001 · (1 + 0.2 · 0.01) = 0.1001 · 1.002 = 0.1003002
    assert ctl.update(9.0, 100) == pytest.approx(0.1003002, rel=1e-12)
    # KL = 0: e = −1 -> clipped to −0.2; n = 1000: β = 0.1003002 · (1 − 0.2 · 0.1) = 0.1003002 · 0.98
    assert ctl.update(0.0, 1000) == pytest.approx(0.098294196, rel=1e-12)
    # KL = 4.8: e = −0.2 exactly (edge of the clip), n = 10000: β · 0.8
    assert ctl.update(4.8, 10_000) == pytest.approx(0.098294196 * 0.8, rel=1e-12)
    assert ctl.value == pytest.approx(0.098294196 * 0.8, rel=1e-12)


def test_adaptive_controller_at_target_stays_put():
    ctl = AdaptiveKLController(0.3, target=2.0, horizon=50)
    assert ctl.update(2.0, 64) == pytest.approx(0.3, rel=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_adaptive_controller_rejects_non_finite_kl(bad):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    with pytest.raises(FloatingPointError):
        ctl.update(bad, 64)
    assert ctl.value == 0.1
