"""float64 models: every metric keeps the images' dtype (no cast to float32 on the way), and matches a float64
brute-force computation to float64 rounding, far tighter than a float32 detour could (~1e-7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igrad.data import Split
from igrad.evaluate import evaluate_model
from igrad.metrics import clean_forward, compute_metrics, confidence_metrics, deletion, insertion
from igrad.normalization import Normalization
from igrad.saliency import METHODS, create_method

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
NORM = Normalization(MEAN, STD)
TOL = 1e-10  # float64 arithmetic of the same formulas in another order; float32 would be off by ~1e-7


def _model() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 4),
        )  # fmt: skip
        .double()
        .eval()
    )


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    raw = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    maps = torch.rand(3, 8, 8, generator=gen, dtype=torch.float64)
    return raw, maps, torch.tensor([0, 1, 3])


def _normalise(raw):
    m = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    s = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return (raw - m) / s


def _prob(model, x, t):
    with torch.no_grad():
        return model(x).softmax(1)[torch.arange(len(t)), t]


def _blur(x):
    """The 11×11, σ = 5 Gaussian of docs/method.md §Metrics, built here in float64 (zero padding, same size)."""
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / 50)
    k = g[:, None] * g[None, :]
    k = k / k.sum()
    return F.conv2d(x, k.expand(3, 1, 11, 11), padding=5, groups=3)


def _curve(model, start, end, maps, t, step):
    """Scores of images taking the k·step most salient pixels from ``end``, one image and step at a time."""
    b, _, h, w = start.shape
    n = math.ceil(h * w / step)
    out = torch.empty(b, n + 1, dtype=torch.float64)
    for i in range(b):
        order = torch.sort(maps[i].flatten(), descending=True, stable=True).indices
        for k in range(n + 1):
            changed = torch.zeros(h * w, dtype=torch.bool)
            changed[order[: min(k * step, h * w)]] = True
            img = torch.where(changed.view(1, h, w), end[i], start[i])
            out[i, k] = _prob(model, img[None], t[i : i + 1])[0]
    return out, (out.sum(1) - out[:, 0] / 2 - out[:, -1] / 2) / n * 100


def test_every_metric_of_a_float64_model_matches_float64_brute_force(data):
    model = _model()
    raw, maps, t = data
    x = _normalise(raw)
    p = _prob(model, x, t)
    o = _prob(model, _normalise(raw * maps[:, None]), t)
    ad = 100 * (p - o).clamp(min=0) / p
    ag = 100 * (o - p).clamp(min=0) / (1 - p)
    ai = 100 * (o > p).double()
    del_curve, del_auc = _curve(model, x, torch.zeros_like(x), maps, t, 8)
    ins_curve, ins_auc = _curve(model, _blur(x), x, maps, t, 8)
    expected = {"ad": ad, "ag": ag, "ai": ai, "ins": ins_auc, "del": del_auc}
    for images, pixels in ((x, "normalised"), (raw, "raw")):
        res = compute_metrics(model, images, maps, t, normalization=NORM, pixels=pixels, batch_size=2)
        for k, v in expected.items():
            assert res.values[k].dtype == torch.float64, k
            torch.testing.assert_close(res.values[k], v, rtol=TOL, atol=TOL)
        torch.testing.assert_close(res.curves["del"], del_curve, rtol=TOL, atol=TOL)
        torch.testing.assert_close(res.curves["ins"], ins_curve, rtol=TOL, atol=TOL)
    conf = confidence_metrics(model, x, maps, t, normalization=NORM)
    torch.testing.assert_close(conf["p"], p, rtol=TOL, atol=TOL)
    torch.testing.assert_close(conf["o"], o, rtol=TOL, atol=TOL)
    torch.testing.assert_close(deletion(model, x, maps, t).auc, del_auc, rtol=TOL, atol=TOL)
    torch.testing.assert_close(insertion(model, x, maps, t).curves, ins_curve, rtol=TOL, atol=TOL)
    clean = clean_forward(model, raw, t, normalization=NORM, pixels="raw")
    assert clean.x.dtype == torch.float64 and clean.score().dtype == torch.float64


def test_logit_curves_of_a_float64_model(data):
    model = _model()
    raw, maps, t = data
    x = _normalise(raw)
    res = deletion(model, x, maps, t, score="logit", step=16)
    with torch.no_grad():
        first = model(x)[torch.arange(3), t]
    assert res.curves.dtype == torch.float64
    torch.testing.assert_close(res.curves[:, 0], first, rtol=TOL, atol=TOL)


def test_every_saliency_method_and_evaluate_run_a_float64_model(data):
    """The maps of a float64 model (float32 maps, as every method returns) feed the metrics, and igrad
    evaluate runs a float64 model on images decoded from integers (its accuracy against a float64 loop)."""
    model = _model()
    raw, _, t = data
    x = _normalise(raw)
    for name in METHODS:
        if name == "cam":
            continue  # the pooled 2×2 grid followed by a linear layer is not CAM's global-average-pool head
        maps = create_method(name, model, **({"n_samples": 2} if name == "smoothgrad" else {}))(x, t)
        res = compute_metrics(model, x, maps, t, normalization=NORM, step=16)
        assert all(v.dtype == torch.float64 and bool(v.isfinite().all()) for v in res.values.values()), name
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    result = evaluate_model(
        model, Split(images, labels, list("abcd")), normalization=NORM, methods="gradient", progress=False
    )
    with torch.no_grad():
        expected = (model(_normalise(images.double() / 255)).argmax(1) == labels).double().mean()
    assert result["model"]["accuracy"] == pytest.approx(float(expected))
