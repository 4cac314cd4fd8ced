"""KL estimators and the KL-coefficient controllers.  Imports only torch.

For samples a ~ π (the sampling policy) and r = π_ref(a) / π(a):

    k1 = log π(a) − log π_ref(a) = −log r          unbiased for KL(π‖π_ref), can be negative per sample
    k2 = ½ (log r)²                                 biased, non-negative, low variance
    k3 = (r − 1) − log r                            unbiased for KL(π‖π_ref) and non-negative

(Schulman, "Approximating KL divergence", 2020.)
"""

from __future__ import annotations

import math

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref, elementwise.  Shapes: [...] -> [...]."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_ref − log π)², elementwise.  Shapes: [...] -> [...]."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = exp(log π_ref − log π), elementwise.  Shapes: [...] -> [...].

    The log-ratio is clamped to ±20 so a single wild token cannot overflow exp() into inf.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Dispatch on the estimator's name ('k1', 'k2' or 'k3')."""
    return KL_ESTIMATORS[name](logprobs, ref_logprobs)


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences":

        e_t   = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_t+1 = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    where KL_t is the mean sequence KL of the batch just collected and n_steps its number of samples.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            raise FloatingPointError(f"adaptive KL controller got KL = {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
