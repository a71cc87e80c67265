"""igrad.stats against hand-computed and textbook values."""

from __future__ import annotations

import math

import pytest
import torch

from igrad import IgradError
from igrad.stats import difference_interval, holm, paired_p_value, summarize, wilson_interval


def test_holm_step_down_by_hand():
    # m = 4, α = 0.05: sorted 0.005 ≤ 0.05/4 reject, 0.01 ≤ 0.05/3 reject, 0.03 > 0.05/2 stop (0.04 kept too)
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    # Bonferroni would keep 0.015 (> 0.05/3); Holm rejects all three: 0.01 ≤ 0.0167, 0.015 ≤ 0.025, 0.02 ≤ 0.05
    assert holm([0.02, 0.01, 0.015]) == [True, True, True]
    assert holm([0.2, 0.001]) == [False, True]
    assert holm([]) == []
    assert holm([0.5] * 3) == [False] * 3


@pytest.mark.parametrize("bad", [[-0.1], [1.5], [float("nan")]])
def test_holm_refuses_non_p_values(bad):
    with pytest.raises(IgradError, match="p-values"):
        holm(bad)


def test_wilson_textbook_values():
    # Newcombe (1998), Table I / Brown, Cai & DasGupta (2001): 0 of 10 -> (0, 0.2775), 5 of 10 -> (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=5e-5)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=5e-5), pytest.approx(0.7634, abs=5e-5))
    # a large n approaches the normal interval p ± 1.96 √(p(1-p)/n) (apart by O(z²/n) = 4e-4 of a width ~0.02)
    lo, hi = wilson_interval(6000, 10000)
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 10000)
    assert lo == pytest.approx(0.6 - half, abs=1e-4) and hi == pytest.approx(0.6 + half, abs=1e-4)


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(IgradError, match="binomial interval"):
        wilson_interval(k, n)


def test_paired_p_value_by_hand_and_agrees_with_the_interval():
    # d = 1, 2, 3: mean 2, sd 1, z = 2 √3 = 3.4641, p = 2 (1 - Φ(3.4641)) = 5.320e-4
    assert paired_p_value([1.0, 2.0, 3.0]) == pytest.approx(5.320e-4, rel=1e-3)
    assert paired_p_value([0.0, 0.0]) == 1.0 and paired_p_value([2.0, 2.0]) == 0.0
    gen = torch.Generator().manual_seed(0)
    for shift in torch.linspace(-0.3, 0.3, 41):
        d = torch.randn(50, generator=gen, dtype=torch.float64) + shift
        s = summarize(d)
        excludes = s["ci_low"] > 0 or s["ci_high"] < 0
        assert (paired_p_value(d) < 0.05) == excludes


def test_paired_p_value_needs_two_values():
    with pytest.raises(IgradError, match="at least 2"):
        paired_p_value([1.0])


def test_difference_interval_newcombe_example():
    # Newcombe (1998), example (a): 56/70 - 48/80 = 0.2000, method 10 interval (0.0524, 0.3339)
    d, lo, hi = difference_interval(48, 80, 56, 70)
    assert d == pytest.approx(0.2)
    assert (lo, hi) == (pytest.approx(0.0524, abs=5e-5), pytest.approx(0.3339, abs=5e-5))
    d, lo, hi = difference_interval(56, 70, 48, 80)  # the other way round: mirrored
    assert (d, lo, hi) == (pytest.approx(-0.2), pytest.approx(-0.3339, abs=5e-5), pytest.approx(-0.0524, abs=5e-5))
