"""A stand-in network a method keeps between calls (Score-CAM's BatchNorm-folded copy, Ablation-CAM's traced
tail) must still compute the model's function, however the model changed since it was built: weights
written through ``p.data`` (an EMA update; no version counter sees it), a tensor swapped in, running
statistics moved, a module replaced. Each held method is checked against brute force on the model as it is
after the change."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import igrad
from igrad.saliency import create_method
from references import brute_ablationcam, brute_scorecam, random_batchnorm

ATOL = 1e-5  # maps in [0, 1]: float32 rounding of the scores, folded or not (test_saliency_parity.py)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return random_batchnorm(igrad.create_model("cifar_resnet18", num_classes=10, width=0.125), seed + 100)


def _ema(model: nn.Module, other: nn.Module) -> None:
    """An EMA-style update written through ``.data`` (parameters and buffers), as many training loops do."""
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.data.mul_(0.5).add_(q.data, alpha=0.5)
    for b, c in zip(model.buffers(), other.buffers(), strict=True):
        if b.is_floating_point():
            b.data.mul_(0.5).add_(c.data, alpha=0.5)


def _swap(model: nn.Module, other: nn.Module) -> None:
    """New tensors assigned to ``p.data`` (a weight-loading idiom that bypasses load_state_dict)."""
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.data = q.data.clone()


def _running_stats(model: nn.Module, other: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.data += 0.5
            m.running_var.data *= 2.0


CHANGES = {"ema": _ema, "swap": _swap, "running statistics": _running_stats}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("change", list(CHANGES))
def test_held_scorecam_scores_the_model_as_it_is_now(x, change):
    model, other = _model(0), _model(1)
    t = torch.tensor([2, 5])
    with create_method("scorecam", model, fold_batchnorm=True) as m:
        before = m(x, t)
        held = m._folded
        assert held is not None  # a copy is held between calls
        with torch.no_grad():
            CHANGES[change](model, other)
        after = m(x, t)
        assert m._folded is not held  # the stale copy was rebuilt
        again = m(x, t)
        assert m._folded is not None
    expected = brute_scorecam(model, model.layer4, x, t)
    assert (after - expected).abs().max() < ATOL
    assert (again - expected).abs().max() < ATOL
    assert (before - expected).abs().max() > 100 * ATOL  # the change mattered, so the test can tell


def test_held_scorecam_keeps_a_copy_that_still_computes_the_model(x):
    """No change: the held copy is reused (checked, not rebuilt)."""
    model = _model(0)
    with create_method("scorecam", model, fold_batchnorm=True) as m:
        m(x, 1)
        held = m._folded
        m(x, 4)
        assert m._folded is held


def test_held_ablationcam_after_weight_changes_and_a_replaced_module(x):
    """Ablation-CAM's traced tail shares the model's tensors, and is checked on every call: after an EMA
    update through ``.data`` and after the head is replaced by a new module (which the traced tail still
    held), its maps are the brute-force ones of the model as it is, and the tail is traced again rather than
    dropped for whole-network runs."""
    model, other = _model(0), _model(1)
    t = torch.tensor([2, 5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to whole-network runs
        with create_method("ablationcam", model) as m:
            m(x, t)
            with torch.no_grad():
                _ema(model, other)
            after_ema = m(x, t)
            expected, tol = brute_ablationcam(model, model.layer4, x, t)
            assert (after_ema - expected).abs().max() <= tol
            first_tail = m._tail
            model.fc = copy.deepcopy(other.fc)  # a new module: the held tail still calls the old one
            after_swap = m(x, t)
            assert m._tail is not None and m._tail is not first_tail
    expected, tol = brute_ablationcam(model, model.layer4, x, t)
    assert (after_swap - expected).abs().max() <= tol
