"""Statistics of an evaluation: means with standard errors, win rates, and diversity.

Pure Python/torch on per-sample values; the sampling lives in ``stages/evaluate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n) (s with n - 1; 0 for n < 2)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float]:
    """Share of paired comparisons where ours scores higher, ties counting half, with its
    standard error (of the mean of the per-pair outcomes 1, 0.5, 0)."""
    if len(ours) != len(theirs):
        raise ValueError(f"win_rate: {len(ours)} scores against {len(theirs)}")
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]
    return mean_and_se(outcomes)


def distinct_share(texts: Sequence[str]) -> float:
    """Distinct responses / responses: 1 when no two are the same, 1/n when all are."""
    return len(set(texts)) / len(texts) if texts else float("nan")


def distinct_n(token_lists: Sequence[Sequence], n: int = 2) -> float:
    """Distinct n-grams / n-grams over all responses (Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", distinct-n)."""
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k), the
    chance that k of the n samples drawn without replacement hold at least one correct one.
    Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k / i), which stays exact in floats."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(scores: Sequence[float], n: int, threshold: float) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, ... up to n (and n), and mean@n, with standard errors over prompts.
    ``scores``: n consecutive scores per prompt; a sample passes when its score >= ``threshold``
    (1 for a 0/1 checker). mean@n is the mean score of a prompt's n samples."""
    if n < 1 or len(scores) % n:
        raise ValueError(f"pass_at_k_table: {len(scores)} scores are not n = {n} per prompt")
    per_prompt = [scores[i : i + n] for i in range(0, len(scores), n)]
    correct = [sum(s >= threshold for s in p) for p in per_prompt]
    ks = sorted({*(2**j for j in range(n.bit_length()) if 2**j <= n), n})
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass@{k}"], out[f"pass@{k}_se"] = mean_and_se([pass_at_k(n, c, k) for c in correct])
    out[f"mean@{n}"], out[f"mean@{n}_se"] = mean_and_se([sum(p) / n for p in per_prompt])
    return out
