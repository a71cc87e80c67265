"""A one-logit (binary) model: the soft-max of a single logit is 1 whatever the input, so every probability-based
metric would give the same number for any map. Those metrics and scores refuse it with one clear error; what
does not use the soft-max (the logit score of the curves, logit gradients) still works and is checked here
against brute-force computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import igrad
from igrad import IgradError
from igrad.data import Split
from igrad.evaluate import evaluate_model
from igrad.metrics import compute_metrics, confidence_metrics, deletion, insertion
from igrad.normalization import Normalization
from references import plain_input_gradient

NORM = Normalization((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
MATCH = "single logit"


def _model(classes: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes)
    ).eval()


@pytest.fixture(scope="module")
def x():
    return NORM.apply(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_softmax_of_one_logit_ignores_the_input(x):
    """Why: with one logit p = 1 for every image, so AD = AG = AI = 0 whatever the map."""
    with torch.no_grad():
        logits = _model()(x)
    assert logits.shape == (3, 1) and torch.equal(logits.softmax(1), torch.ones(3, 1))


def test_probability_metrics_refuse_a_one_logit_model(x):
    model = _model()
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = [
        lambda: compute_metrics(model, x, maps, normalization=NORM),
        lambda: compute_metrics(model, x, maps, metrics="ad", normalization=NORM),
        lambda: compute_metrics(model, x, maps, metrics="ins,del", normalization=NORM),
        lambda: confidence_metrics(model, x, maps, normalization=NORM),
        lambda: insertion(model, x, maps),
        lambda: deletion(model, x, maps, score="prob"),
        lambda: igrad.input_gradients(model, x, score="prob"),
        lambda: igrad.GradientAlignmentLoss(score="prob")(model, x, torch.zeros(3, dtype=torch.long)),
    ]
    for call in calls:
        with pytest.raises(IgradError, match=MATCH) as err:
            call()
        assert "[0, z]" in str(err.value)


def test_evaluate_refuses_a_one_logit_model_before_any_method_runs(monkeypatch):
    import igrad.evaluate as ev

    ran = []
    monkeypatch.setattr(ev, "_saliency", lambda *a, **k: ran.append(1))
    split = Split(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"])
    with pytest.raises(IgradError, match=MATCH):
        evaluate_model(_model(), split, normalization=NORM, methods="gradcam", progress=False, accuracy=False)
    assert not ran


def _logit_curve(model, start, end, maps, step):
    """Insertion/deletion curve of the logit, one image and one step at a time, written out here."""
    b, _, h, w = start.shape
    n = math.ceil(h * w / step)
    curves = torch.empty(b, n + 1)
    for i in range(b):
        order = torch.sort(maps[i].flatten(), descending=True, stable=True).indices
        for k in range(n + 1):
            changed = torch.zeros(h * w, dtype=torch.bool)
            changed[order[: min(k * step, h * w)]] = True
            img = torch.where(changed.view(1, h, w), end[i], start[i])
            with torch.no_grad():
                curves[i, k] = model(img[None])[0, 0]
    return curves


def test_logit_curves_of_a_one_logit_model_follow_the_map(x):
    """score='logit' does not use the soft-max: the curves are the brute-force ones, and two maps give two AUCs."""
    model = _model()
    maps = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    aucs = []
    for m in maps:
        res = compute_metrics(model, x, m, metrics="del", score="logit", step=8, normalization=NORM)
        ref = _logit_curve(model, x, torch.zeros_like(x), m, 8)
        torch.testing.assert_close(res.curves["del"], ref, rtol=1e-5, atol=1e-5)
        aucs.append(res.values["del"])
    assert not torch.allclose(aucs[0], aucs[1])


def test_logit_gradients_of_a_one_logit_model_are_plain_autograd(x):
    model = _model()
    t = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(igrad.gradient(model, x, t), plain_input_gradient(model, x, t), rtol=1e-5, atol=1e-7)


def test_the_two_logit_recipe_gives_the_sigmoid(x):
    """The fix the error suggests: logits [0, z] soft-max to [1 − σ(z), σ(z)], and then the map matters."""
    one = _model()
    two = nn.Sequential(one, _ZeroThen())
    with torch.no_grad():
        z = one(x)[:, 0]
        p = two(x).softmax(1)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(z))
    torch.testing.assert_close(p[:, 0], 1 - torch.sigmoid(z))
    ones, zeros = torch.ones(3, 8, 8), torch.zeros(3, 8, 8)
    kept = confidence_metrics(two, x, ones, 1, normalization=NORM)
    blank = confidence_metrics(two, x, zeros, 1, normalization=NORM)
    assert float(kept["ad"].max()) < 1e-3 and not torch.allclose(blank["o"], kept["o"])


class _ZeroThen(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(z), z], 1)
