"""Per-token KL(pi_theta || pi_ref) estimators from the sampled token's log-probabilities.

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With a_t ~ pi_theta and r = pi_ref(a_t) / pi_theta(a_t):
    k1 = -log r              unbiased, high variance, can be negative per token
    k2 = (log r)^2 / 2       biased, low variance, always >= 0
    k3 = (r - 1) - log r     unbiased, low variance, always >= 0
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs (B, T).

    logprobs:     log pi_theta(a_t|s_t)
    ref_logprobs: log pi_ref(a_t|s_t)
    """
    log_ratio = logprobs - ref_logprobs  # = -log r
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3")
