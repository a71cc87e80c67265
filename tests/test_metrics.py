"""igrad.metrics against hand-computed values and an independent, straightforward RISE loop."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igrad
from igrad.errors import IgradError
from igrad.metrics import (
    METRICS,
    blur_kernel,
    clean_forward,
    compute_metrics,
    confidence_metrics,
    deletion,
    gaussian_blur,
    insertion,
    resolve_metrics,
    summarize,
)
from igrad.normalization import Normalization
from references import metric_tolerances


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class WeightedSum(nn.Module):
    """Two classes: logits ``[s, -s]`` with ``s = Σ w ⊙ x`` over all of C·H·W."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weight)

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


# --------------------------------------------------------------------------------------------------
# AD / AG / AI by hand


def test_confidence_metrics_hand_computed():
    # two channels of 1x2 pixels, per-channel normalisation
    mean, std = [0.5, 0.25], [0.25, 0.5]
    raw = torch.tensor(
        [
            [[[1.0, 0.5]], [[0.25, 0.75]]],  # sample 0
            [[[0.0, 1.0]], [[0.5, 0.25]]],  # sample 1
            [[[0.75, 0.75]], [[1.0, 0.0]]],  # sample 2
        ]
    )
    x = (raw - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    maps = torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 1.0]]])
    w = torch.tensor([[[1.0, -1.0]], [[2.0, 0.5]]])
    model = WeightedSum(w)
    target = torch.tensor([0, 0, 1])

    def s_of(r):  # model score written out pixel by pixel, normalising by hand
        total = 0.0
        for ch in range(2):
            for j in range(2):
                total += float(w[ch, 0, j]) * (r[ch][j] - mean[ch]) / std[ch]
        return total

    exp = {k: [] for k in ("p", "o", "ad", "ag", "ai")}
    for i in range(3):
        r = [[float(v) for v in raw[i, ch, 0]] for ch in range(2)]
        rm = [[r[ch][j] * float(maps[i, 0, j]) for j in range(2)] for ch in range(2)]
        sign = 1 if target[i] == 0 else -1
        p, o = sigmoid(2 * sign * s_of(r)), sigmoid(2 * sign * s_of(rm))  # softmax of [s, -s]
        exp["p"].append(p)
        exp["o"].append(o)
        exp["ad"].append(100 * max(0.0, p - o) / p)
        exp["ag"].append(100 * max(0.0, o - p) / (1 - p))
        exp["ai"].append(100.0 if o > p else 0.0)
    out = confidence_metrics(model, x, maps, target, mean=mean, std=std)
    for k, v in exp.items():
        torch.testing.assert_close(out[k], torch.tensor(v, dtype=torch.float32), atol=1e-5, rtol=1e-5, msg=k)
    # the chosen values exercise every branch: a drop, a gain, and an unchanged image (map of ones)
    assert out["ad"][0] > 0 and out["ag"][0] == 0
    assert out["ag"][1] > 0 and out["ad"][1] == 0 and out["ai"][1] == 100
    assert out["ad"][2] == 0 and out["ag"][2] == 0 and out["ai"][2] == 0


def test_confidence_metrics_zero_denominators():
    # logits so large that p == 1 exactly (float32): AG's denominator is 0 and its term must be 0, not NaN
    model = WeightedSum(torch.full((1, 2, 2), 100.0))
    x = torch.ones(1, 1, 2, 2)
    out = confidence_metrics(model, x, torch.ones(1, 2, 2), torch.tensor([0]), mean=[0.0], std=[1.0])
    assert out["p"].item() == 1.0
    assert out["ag"].item() == 0 and out["ad"].item() == 0 and out["ai"].item() == 0
    # and p == 0 (class 1): AD's denominator is 0
    out = confidence_metrics(model, x, torch.zeros(1, 2, 2), torch.tensor([1]), mean=[0.0], std=[1.0])
    assert out["p"].item() == 0.0
    assert torch.isfinite(out["ad"]).all() and out["ad"].item() == 0
    assert out["ag"].item() == pytest.approx(50.0, abs=1e-4)  # o = sigmoid(0) = 0.5, gain 0.5 / (1 - 0)


# --------------------------------------------------------------------------------------------------
# insertion / deletion by hand

X9 = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # pixels 1..9, row-major
# ties: 0.9 at positions 1, 4; 0.5 at 0, 2, 5, 8; 0.1 at 3, 7; 0.0 at 6
S9 = torch.tensor([[[0.5, 0.9, 0.5], [0.1, 0.9, 0.5], [0.0, 0.1, 0.5]]])
# order 1, 4, 0, 2, 5, 8, 3, 7, 6 -> pixel values 2, 5, 1, 3, 6, 9, 4, 8, 7


def test_deletion_ties_and_step_not_dividing():
    model = WeightedSum(torch.ones(1, 3, 3))
    # step 2 over 9 pixels: n = 5 steps, 6 points, pixels removed 0, 2, 4, 6, 8, 9
    auc, curves = deletion(model, X9, S9, torch.tensor([0]), step=2, score="logit")
    expected = [45.0, 38.0, 34.0, 19.0, 7.0, 0.0]
    assert curves.shape == (1, 6)
    torch.testing.assert_close(curves[0], torch.tensor(expected))
    assert auc.item() == pytest.approx((sum(expected) - 45 / 2 - 0 / 2) / 5 * 100)  # 2410
    # default score: softmax probability of the target class, softmax([s, -s])_0 = sigmoid(2s)
    model = WeightedSum(torch.full((1, 3, 3), 0.02))
    auc, curves = deletion(model, X9, S9, torch.tensor([0]), step=2)
    probs = [sigmoid(2 * 0.02 * v) for v in expected]
    torch.testing.assert_close(curves[0], torch.tensor(probs))
    assert auc.item() == pytest.approx((sum(probs) - probs[0] / 2 - probs[-1] / 2) / 5 * 100, rel=1e-5)


def test_insertion_zero_and_mean_substrates_and_default_step():
    model = WeightedSum(torch.ones(1, 3, 3))
    auc, curves = insertion(model, X9, S9, 0, step=2, substrate="zero", score="logit")
    expected = [0.0, 7.0, 11.0, 26.0, 38.0, 45.0]
    torch.testing.assert_close(curves[0], torch.tensor(expected))
    assert auc.item() == pytest.approx((127 - 0 - 22.5) / 5 * 100)  # 2090
    # mean substrate: removed pixels become the image's channel mean (5)
    _, curves = deletion(model, X9, S9, 0, step=2, substrate="mean", score="logit")
    torch.testing.assert_close(curves[0], torch.tensor([45.0, 48.0, 54.0, 49.0, 47.0, 45.0]))
    # step None = the image width (3): n = 3, pixels removed 0, 3, 6, 9
    auc, curves = deletion(model, X9, S9, 0, score="logit")
    torch.testing.assert_close(curves[0], torch.tensor([45.0, 37.0, 19.0, 0.0]))
    assert auc.item() == pytest.approx((101 - 22.5) / 3 * 100, rel=1e-6)
    # a callable substrate (fn(x) -> like x): everything removed becomes 1
    _, curves = deletion(model, X9, S9, 0, step=9, substrate=torch.ones_like, score="logit")
    torch.testing.assert_close(curves[0], torch.tensor([45.0, 9.0]))


def test_curves_move_all_channels_targets_and_samples():
    # two channels (the second 10x the first): deleting a pixel removes both, so the curve is 11x
    x = torch.cat([X9, 10 * X9], 1)
    x = torch.cat([x, x.flip(-1)])  # sample 1: mirrored image (its ranking differs)
    maps = torch.cat([S9, S9])
    model = WeightedSum(torch.ones(2, 3, 3))
    _, curves = deletion(model, x, maps, torch.tensor([0, 1]), step=2, score="logit")
    torch.testing.assert_close(curves[0], 11 * torch.tensor([45.0, 38.0, 34.0, 19.0, 7.0, 0.0]))
    # mirrored: pixel values in ranking order 2, 5, 3, 1, 4, 7, 6, 8, 9; class 1 logit is -s
    torch.testing.assert_close(curves[1], -11 * torch.tensor([45.0, 38.0, 34.0, 23.0, 9.0, 0.0]))


def test_blur_kernel_and_blur_against_explicit_loops():
    k = blur_kernel()
    assert k.shape == (11, 11) and k.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the formula, checked at two entries: k(i, j) ∝ exp(-((i-5)^2 + (j-5)^2) / 50)
    assert (k[0, 0] / k[5, 5]).item() == pytest.approx(math.exp(-50 / 50))
    assert (k[5, 8] / k[5, 5]).item() == pytest.approx(math.exp(-9 / 50))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64)
    out = gaussian_blur(x)
    kk = [[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / 50) for j in range(11)] for i in range(11)]
    z = sum(map(sum, kk))
    ref = np.zeros((2, 6, 7))
    xa = x[0].numpy()
    for c in range(2):
        for r in range(6):
            for q in range(7):
                acc = 0.0
                for i in range(11):
                    for j in range(11):
                        rr, qq = r + i - 5, q + j - 5
                        if 0 <= rr < 6 and 0 <= qq < 7:  # zero padding
                            acc += kk[i][j] / z * xa[c, rr, qq]
                ref[c, r, q] = acc
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# agreement with a straightforward RISE loop (one image, one step at a time) on a real CNN


def rise_reference(model, img, sal, target, mode, step):
    """RISE CausalMetric.single_run as published, with the choices of docs/method.md §Metrics written out independently:
    ranking by decreasing saliency with ties by position, blur substrate for insertion, 0 for deletion."""
    _, c, h, w = img.shape
    hw = h * w
    n = (hw + step - 1) // step
    sal_list = sal.reshape(-1).tolist()
    order = sorted(range(hw), key=lambda q: (-sal_list[q], q))
    g = np.array([[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / 50.0) for j in range(11)] for i in range(11)])
    kern = torch.tensor(g / g.sum(), dtype=img.dtype)[None, None].repeat(c, 1, 1, 1)
    blurred = F.conv2d(img, kern, padding=5, groups=c)
    if mode == "del":
        start, finish = img.clone(), torch.zeros_like(img)
    else:
        start, finish = blurred.clone(), img.clone()
    scores = []
    for i in range(n + 1):
        with torch.no_grad():
            scores.append(torch.softmax(model(start), 1)[0, target].item())
        if i < n:
            for q in order[step * i : step * (i + 1)]:
                start[0, :, q // w, q % w] = finish[0, :, q // w, q % w]
    auc = (sum(scores) - scores[0] / 2 - scores[-1] / 2) / n
    return torch.tensor(scores), 100 * auc


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    maps = torch.randint(0, 6, (3, 16, 16), generator=gen).float() / 5  # many ties
    target = torch.tensor([0, 3, 7])
    return model, x, maps, target


@pytest.mark.parametrize("mode,step", [("del", None), ("ins", None), ("del", 37), ("ins", 37)])
def test_agrees_with_straightforward_rise(small_cnn, mode, step):
    model, x, maps, target = small_cnn
    fn = deletion if mode == "del" else insertion
    auc, curves = fn(model, x, maps, target, step=step, batch_size=16)
    s = 16 if step is None else step
    assert curves.shape == (3, math.ceil(256 / s) + 1)
    for i in range(x.shape[0]):
        ref_curve, ref_auc = rise_reference(model, x[i : i + 1], maps[i], int(target[i]), mode, s)
        torch.testing.assert_close(curves[i], ref_curve, atol=1e-5, rtol=1e-4)
        assert auc[i].item() == pytest.approx(ref_auc, abs=1e-3)


def test_batch_sizes_give_the_same_numbers(small_cnn):
    model, x, maps, target = small_cnn
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = (x * 0.1 + 0.5).clamp(0, 1)  # a plausible normalised image for the masking metrics
    xn = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    results = [
        compute_metrics(model, xn, maps, target, "all", mean=mean, std=std, step=23, batch_size=bs) for bs in (1, 7, 64)
    ]
    ref = results[-1]
    # different batch sizes run different float32 kernels: the numbers agree within what a kernel-level
    # change of the logits can move them (references.metric_tolerances), not bit for bit
    with torch.no_grad():
        tol = metric_tolerances(model(xn), target)
    for res in results[:-1]:
        for k in METRICS:
            torch.testing.assert_close(res.values[k], ref.values[k], atol=tol[k], rtol=0, msg=k)
        for k in ("ins", "del"):
            torch.testing.assert_close(res.curves[k], ref.curves[k], atol=tol["curve"], rtol=0, msg=k)


def test_model_modes_and_state_restored(small_cnn):
    model, x, maps, target = small_cnn
    model.train()
    bn = model.bn1
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    try:
        deletion(model, x[:1], maps[:1], target[:1], step=128)
        assert model.training and all(m.training for m in model.modules())
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
        # eval-mode numbers whatever the mode: same as with the model in eval mode
        a = insertion(model, x[:2], maps[:2], target[:2], step=128).curves
        model.eval()
        b = insertion(model, x[:2], maps[:2], target[:2], step=128).curves
        torch.testing.assert_close(a, b)
    finally:
        model.eval()


def test_target_none_is_prediction(small_cnn):
    model, x, maps, _ = small_cnn
    pred = model(x).argmax(1)
    a = deletion(model, x, maps, None, step=128).curves
    b = deletion(model, x, maps, pred, step=128).curves
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# aggregation


def test_summarize_normal_and_bootstrap():
    vals = [3.0, 7.0, 1.0, 4.0, 10.0, 2.0]
    s = summarize(vals)
    m, sd = statistics.mean(vals), statistics.stdev(vals)
    assert s["n"] == 6 and s["mean"] == pytest.approx(m)
    assert s["ci_high"] - m == pytest.approx(1.959964 * sd / math.sqrt(6), rel=1e-5)
    assert m - s["ci_low"] == pytest.approx(1.959964 * sd / math.sqrt(6), rel=1e-5)
    b1 = summarize(vals, ci="bootstrap", seed=3)
    b2 = summarize(vals, ci="bootstrap", seed=3)
    assert b1 == b2 and b1["ci_low"] < m < b1["ci_high"]
    assert min(vals) <= b1["ci_low"] and b1["ci_high"] <= max(vals)
    one = summarize([5.0])
    assert one == {"mean": 5.0, "ci_low": None, "ci_high": None, "n": 1}
    with pytest.raises(IgradError, match="confidence interval"):
        summarize(vals, ci="wilson")


def test_metric_registry_and_names():
    assert list(METRICS) == ["ad", "ag", "ai", "ins", "del"]
    assert [METRICS[k].higher_is_better for k in METRICS] == [False, True, True, True, False]
    assert resolve_metrics("all") == list(METRICS)
    assert resolve_metrics("del, ad,ad") == ["del", "ad"]
    with pytest.raises(IgradError, match=r"unknown metric 'insertion'.*'ins'"):
        resolve_metrics("ad,insertion")


# --------------------------------------------------------------------------------------------------
# clear errors


def test_errors_are_clear():
    model = WeightedSum(torch.ones(1, 3, 3))
    t = torch.tensor([0])
    with pytest.raises(IgradError, match=r"maps must have shape \[B, H, W\] = \[1, 3, 3\].*squeeze"):
        deletion(model, X9, S9[:, None], t)
    with pytest.raises(IgradError, match=r"maps must have shape"):
        insertion(model, X9, S9[:, :2], t)
    with pytest.raises(IgradError, match=r"maps must have shape"):
        confidence_metrics(model, X9, S9.expand(2, 3, 3), t, mean=[0.0], std=[1.0])
    bad = S9.clone()
    bad[0, 1, 1] = float("nan")
    for fn in (deletion, insertion):
        with pytest.raises(IgradError, match="NaN"):
            fn(model, X9, bad, t)
    with pytest.raises(IgradError, match="NaN"):
        confidence_metrics(model, X9, bad, t, mean=[0.0], std=[1.0])
    with pytest.raises(IgradError, match=r"\[0, 1\]"):
        confidence_metrics(model, X9, S9 * 3, t, mean=[0.0], std=[1.0])
    with pytest.raises(IgradError, match="unknown metric"):
        compute_metrics(model, X9, S9, t, "ad,auc", mean=[0.0], std=[1.0])
    with pytest.raises(IgradError, match="unknown substrate 'blurr'"):
        insertion(model, X9, S9, t, substrate="blurr")
    with pytest.raises(IgradError, match="unknown score"):
        insertion(model, X9, S9, t, score="log-prob")
    with pytest.raises(IgradError, match="step"):
        deletion(model, X9, S9, t, step=0)
    with pytest.raises(IgradError, match="batch_size"):
        deletion(model, X9, S9, t, batch_size=0)
    with pytest.raises(IgradError, match=r"target must have shape \[1\]"):
        deletion(model, X9, S9, torch.tensor([0, 1]))
    with pytest.raises(IgradError, match="out of range"):
        deletion(model, X9, S9, torch.tensor([2]))
    with pytest.raises(IgradError, match="one value per channel"):
        confidence_metrics(model, X9, S9, t, mean=[0.0, 0.0], std=[1.0, 1.0])


# --- raw pixels, one clean forward ---------------------------------------------------------------------


class Counting(nn.Module):
    """A model that counts the images it is given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.inner(x)


def test_raw_pixels_are_masked_then_normalised(small_cnn):
    model, x, maps, target = small_cnn
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    raw = (x * 0.1 + 0.5).clamp(0, 1)
    m, s = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.no_grad():  # the metrics written out: p on (raw − m)/s, o on (raw ⊙ S − m)/s, one forward each
        p = model((raw - m) / s).softmax(1)[torch.arange(3), target]
        o = model((raw * maps[:, None] - m) / s).softmax(1)[torch.arange(3), target]
    out = confidence_metrics(model, raw, maps, target, normalization=norm, pixels="raw", batch_size=3)
    assert torch.equal(out["p"], p) and torch.equal(out["o"], o)
    # the same images given normalised: the raw pixels are then normalization.invert(x), equal up to rounding
    xn = norm.apply(raw)
    again = confidence_metrics(model, xn, maps, target, normalization=norm, batch_size=3)
    with torch.no_grad():
        tol = metric_tolerances(model(xn), target)
    for k in ("ad", "ag"):
        torch.testing.assert_close(again[k], out[k], atol=tol[k], rtol=0)
    with pytest.raises(IgradError, match="normalization"):
        confidence_metrics(model, raw, maps, target, pixels="raw")
    with pytest.raises(IgradError, match="unknown pixels"):
        deletion(model, raw, maps, target, pixels="unit", normalization=norm)


def test_one_clean_forward_serves_every_metric(small_cnn):
    model, x, maps, target = small_cnn
    norm = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    counting = Counting(model)
    clean = clean_forward(counting, x, target, normalization=norm)
    assert counting.seen == 3 and torch.equal(clean.target, target)
    counting.seen = 0
    res = compute_metrics(counting, clean, maps, metrics="all", step=23, batch_size=7)
    n = math.ceil(256 / 23)
    assert counting.seen == 3 + 2 * 3 * n  # masked images, then each curve without its clean point
    # the clean points are the clean forward's scores; the rest as computed from the images alone
    p = clean.score()
    assert torch.equal(res.curves["del"][:, 0], p) and torch.equal(res.curves["ins"][:, -1], p)
    alone = compute_metrics(model, x, maps, target, "all", normalization=norm, step=23, batch_size=7)
    for k in METRICS:
        assert torch.equal(res.values[k], alone.values[k]), k
    # given logits are used as they are (no forward): the prediction and p come from them
    fake = torch.zeros(3, 10)
    fake[:, 4] = 1.0
    counting.seen = 0
    given = clean_forward(counting, x, None, normalization=norm, logits=fake)
    assert counting.seen == 0 and given.target.tolist() == [4, 4, 4]
    with pytest.raises(IgradError, match="logits must have shape"):
        clean_forward(model, x, target, logits=torch.zeros(2, 10))
