"""Statistics of results: a mean with its confidence interval, paired comparisons and their p-values, the
Holm correction for many comparisons, and the binomial (Wilson) interval of an accuracy.

Used by :mod:`igrad.evaluate` (every metric cell, the paired differences of two models) and the reports
.
Plain float64 arithmetic; the normal quantile is :class:`statistics.NormalDist`'s.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

from .errors import IgradError, unknown_name

__all__ = ["summarize", "paired_p_value", "holm", "wilson_interval", "difference_interval"]


def _normal_quantile(level: float) -> float:
    """``z`` of a two-sided ``level`` interval (1.96 at 0.95); :class:`IgradError` unless 0 < level < 1."""
    if not 0 < level < 1:
        raise IgradError(f"level must be in (0, 1), got {level}")
    return statistics.NormalDist().inv_cdf(0.5 + level / 2)


def summarize(
    values: torch.Tensor | Sequence[float],
    *,
    ci: str = "normal",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Mean over samples with a ``level`` confidence interval: ``{"mean", "ci_low", "ci_high", "n"}``.

    ``ci="normal"``: ``mean ± z·sd/√N`` (``sd`` with N − 1, ``z`` the normal quantile, 1.96 at 95%);
    ``ci="bootstrap"``: the percentile interval of ``n_boot`` resampled means (seeded by ``seed``).
    With fewer than two samples the interval is ``None``.
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise IgradError("cannot summarise an empty set of values")
    if not bool(torch.isfinite(v).all()):
        raise IgradError("cannot summarise non-finite values")
    z = _normal_quantile(level)
    n = int(v.numel())
    mean = float(v.mean())
    low = high = None
    if n >= 2:
        if ci == "normal":
            half = z * float(v.std()) / math.sqrt(n)
            low, high = mean - half, mean + half
        elif ci == "bootstrap":
            gen = torch.Generator().manual_seed(seed)
            rows = max(1, 2_000_000 // n)  # resample in chunks to bound memory
            parts = []
            for i in range(0, n_boot, rows):
                parts.append(v[torch.randint(0, n, (min(rows, n_boot - i), n), generator=gen)].mean(1))
            means = torch.cat(parts)
            q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
            low, high = (float(a) for a in torch.quantile(means, q))
        else:
            raise unknown_name("confidence interval", ci, ("normal", "bootstrap"))
    elif ci not in ("normal", "bootstrap"):
        raise unknown_name("confidence interval", ci, ("normal", "bootstrap"))
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n}


def paired_p_value(differences: torch.Tensor | Sequence[float]) -> float:
    """Two-sided p-value of "the mean per-sample difference is 0", by the normal approximation that
    :func:`summarize`'s ``normal`` interval uses (so ``p < 1 - level`` exactly when that interval excludes 0):
    ``z = mean / (sd / √N)`` (``sd`` with N − 1), ``p = 2 (1 − Φ(|z|))``. All-equal differences give
    ``p = 0`` when their mean is not 0, else 1. Needs N ≥ 2 finite values (:class:`IgradError`)."""
    d = torch.as_tensor(differences, dtype=torch.float64).reshape(-1)
    if d.numel() < 2 or not bool(torch.isfinite(d).all()):
        raise IgradError(f"a paired test needs at least 2 finite differences, got {d.numel()} values")
    mean, sd = float(d.mean()), float(d.std())
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    z = abs(mean) / (sd / math.sqrt(d.numel()))
    return 2 * (1 - statistics.NormalDist().cdf(z))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction (Holm 1979): which of ``m`` hypotheses are rejected with the family-wise
    error rate held at ``alpha``. Sort the p-values ``p_(1) ≤ … ≤ p_(m)``; reject ``H_(1) … H_(k−1)`` where
    ``k`` is the first rank with ``p_(k) > alpha / (m − k + 1)``. Returns one bool per input, in input order."""
    if not 0 < alpha < 1:
        raise IgradError(f"alpha must be in (0, 1), got {alpha}")
    p = [float(v) for v in p_values]
    if any(not (0 <= v <= 1) for v in p):
        raise IgradError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    rejected = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        if p[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion ``k / n`` (e.g. top-1 accuracy over ``n`` images):
    ``(p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)``, ``z`` the normal quantile of ``level``
    (Wilson 1927). Raises :class:`IgradError` unless ``0 ≤ successes ≤ n`` and ``n ≥ 1``."""
    if n < 1 or not 0 <= successes <= n:
        raise IgradError(f"a binomial interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _normal_quantile(level)
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def difference_interval(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float, float]:
    """``p₂ − p₁`` of two binomial proportions (``k/n``, e.g. two models' top-1 accuracy) with Newcombe's
    hybrid score interval built from the two Wilson intervals ``(l_i, u_i)`` (Newcombe 1998, method 10):
    ``(d − √((p₂ − l₂)² + (u₁ − p₁)²), d + √((u₂ − p₂)² + (p₁ − l₁)²))``. It treats the samples as
    independent: for two models scored on the same images it is conservative (their errors correlate).
    Returns ``(d, low, high)``."""
    l1, u1 = wilson_interval(k1, n1, level)
    l2, u2 = wilson_interval(k2, n2, level)
    p1, p2 = k1 / n1, k2 / n2
    d = p2 - p1
    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
