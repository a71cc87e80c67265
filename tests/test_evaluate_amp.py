"""Evaluation in bf16: saliency maps and metrics under ``igrad.precision.autocast`` against
their float32 values, within bounds derived from bf16 arithmetic, and not bit-identical (autocast really ran).

The bound. bf16 keeps 8 significand bits: one rounding changes a value by at most ``u = 2⁻⁸ ≈ 3.9e-3``
relative. On the CPU, autocast rounds a convolution's or a linear layer's input, weight and bias to bf16 and
its output too (3 roundings of the magnitudes ``|W||x| + |b|``, the products accumulating in float32); the
average pool rounds its output (1); ReLU is exact and 1-Lipschitz. Propagating ``|error| ≤ k·u·magnitude``
through the tiny network (conv 3, conv 3, pool 1, linear 3) bounds, to first order, each logit's error by
``δ = 10·u·M(|x|)``, ``M`` the *magnitude network* (the same layers with ``|W|``, ``|b|``, no ReLU, on ``|x|``);
the activation ``A`` of the target layer by ``6·u·m_A``. A softmax probability then moves by a factor within
``exp(±2δ)`` (``|Δ log p_c| ≤ |Δy_c| + max_j |Δy_j|``). The backward rounds the linear layer's input gradient
(weight, output: 2) and each convolution's (2); a ReLU mask may *flip* where the pre-activation is within its
error bound of 0, and such a unit's whole gradient is then counted. A map ``S`` with error ``≤ E`` and span
``r`` is normalised to ``S' = (S − min)/r`` with error ``≤ 4E/(r − 2E)``. Each bound below is these rules
applied step by step (in float64, first order, times 1.05 for the second-order terms), plus 1e-5 for float32.

Worst-case bounds are tight only without cancellations, so the tiny network has non-negative weights (and
biases that still cut some units); each bound must also be non-trivial (< 0.5) where the method allows it.
Score-CAM's and Ablation-CAM's maps of such a network are flat (a small span ``r``), so their map bound is
trivial there: their channel weights are checked too (Ablation-CAM's non-trivially: ``ŷ`` and ``ŷ^(k)`` share
every rounding but channel ``k``'s; Score-CAM's masks of flat channels keep its weight bound loose).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igrad import IgradError
from igrad.evaluate import EvalConfig, evaluate_model
from igrad.metrics import clean_forward, confidence_metrics, deletion, gaussian_blur, insertion
from igrad.normalization import Normalization
from igrad.precision import autocast, native_bf16
from igrad.saliency import create_method

U = 2.0**-8  # bf16 unit roundoff
SAFETY = 1.05  # second-order terms of the first-order bounds
SLACK = 1e-5  # float32 rounding of the reference itself

pytestmark = pytest.mark.filterwarnings("ignore:bf16 autocast on this CPU is emulated")


class Tiny(nn.Module):
    """conv → ReLU → conv → ReLU (the target layer ``features``) → global average pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
@torch.no_grad()
def setup() -> tuple[Tiny, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny().eval()
    for layer in _layers(model):  # few cancellations, so that worst-case bounds are tight enough to test
        layer.weight.abs_()
        layer.bias.mul_(2).sub_(0.6 if isinstance(layer, nn.Conv2d) else 0)
    model.fc.weight.mul_(0.2)  # logits ~1: Score-CAM's softmax of them is then not too sensitive
    x = torch.rand(6, 3, 8, 8) * 2
    return model, x, model(x).argmax(1)


def _double(model: Tiny) -> Tiny:
    return copy.deepcopy(model).double()


def _layers(model: Tiny) -> tuple[nn.Conv2d, nn.Conv2d, nn.Linear]:
    c1, c2 = model.features[0], model.features[2]
    assert isinstance(c1, nn.Conv2d) and isinstance(c2, nn.Conv2d)
    return c1, c2, model.fc


@torch.no_grad()
def _magnitudes(model: Tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64: pre-activations ``z1``, ``z2``, the activation ``A`` and the magnitude network's ``m1``, ``mA``,
    ``my`` (max over classes) on ``|x|``."""
    c1, c2, fc = _layers(_double(model))
    x = x.double()
    z1 = c1(x)
    z2 = c2(z1.relu())
    m1 = F.conv2d(x.abs(), c1.weight.abs(), c1.bias.abs(), padding=1)
    ma = F.conv2d(m1, c2.weight.abs(), c2.bias.abs(), padding=1)
    my = F.linear(ma.mean(dim=(2, 3)), fc.weight.abs(), fc.bias.abs()).amax(1)
    return {
        "z1": z1,
        "z2": z2,
        "A": z2.relu(),
        "m1": m1,
        "mA": ma,
        "my": my,
        "W1": c1.weight.detach(),
        "W2": c2.weight.detach(),
    }


@torch.no_grad()
def _lipschitz(model: Tiny, d: torch.Tensor) -> torch.Tensor:
    """Per sample, a bound on ``max_c |y_c(a) − y_c(b)|`` for ``|a − b| ≤ d`` (the magnitude network, no biases)."""
    c1, c2, fc = _layers(model)
    h = F.conv2d(F.conv2d(d.double(), c1.weight.double().abs(), padding=1), c2.weight.double().abs(), padding=1)
    return F.linear(h.mean(dim=(2, 3)), fc.weight.double().abs()).amax(1)


def _normalised_bound(e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per image, the error bound of a min-max normalised map whose float32 version is ``s`` ``[B, H, W]`` and
    whose error is at most ``e`` (per image): ``4E/(r − 2E)``, 1 where ``r ≤ 2E`` (maps lie in [0, 1])."""
    r = s.flatten(1).amax(1) - s.flatten(1).amin(1)
    bound = torch.where(r > 2 * e, 4 * e / (r - 2 * e).clamp(min=1e-300), torch.ones_like(e))
    return (SAFETY * bound).clamp(max=1) + SLACK


def _normalised(s: torch.Tensor) -> torch.Tensor:
    lo, hi = s.flatten(1).amin(1)[:, None, None], s.flatten(1).amax(1)[:, None, None]
    return (s - lo) / (hi - lo)


def _maps(model: Tiny, name: str, x: torch.Tensor, t: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    layer = {} if name == "gradient" else {"target_layer": "features"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: stand-in checks pass under autocast
        ref = create_method(name, model, **layer, **kw)(x, t).double()
        with autocast("cpu"):
            got = create_method(name, model, **layer, **kw)(x, t).double()
    assert got.dtype == ref.dtype and not torch.equal(got, ref), f"{name}: bf16 maps are the float32 ones"
    return ref, got


def _check(
    name: str, ref: torch.Tensor, got: torch.Tensor, e: torch.Tensor, raw: torch.Tensor, nontrivial: bool = True
) -> None:
    """``got`` (bf16) within the bound of ``ref`` (float32), both normalised, for an error ``e`` [B] of the
    unnormalised map, whose float64 value is ``raw`` [B, H, W]."""
    assert torch.allclose(ref, _normalised(raw), atol=1e-4), f"{name}: the float64 map is not the float32 one"
    bound = _normalised_bound(e, raw)
    diff = (got - ref).abs().flatten(1).amax(1)
    assert bool((diff <= bound).all()), f"{name}: |ΔS| {diff.tolist()} > bound {bound.tolist()}"
    if nontrivial:
        assert float(bound.max()) < 0.5, f"{name}: the bound {bound.tolist()} is too loose to test anything"


def _weights(model: Tiny, name: str, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CAM method's channel weights ``[B, K]`` in float32 and in bf16 autocast."""
    out = []
    for amp in (False, True):
        method = create_method(name, model, target_layer="features")
        with method, autocast("cpu", amp):
            out.append(method.weights(method._forward(x, t)).double())
    return out[0], out[1]


def _check_weights(
    name: str, w32: torch.Tensor, w16: torch.Tensor, w: torch.Tensor, d_w: torch.Tensor, nontrivial: bool = True
) -> None:
    """The weights, where the maps' bound is trivial (flat maps of a network with few cancellations)."""
    assert torch.allclose(w32, w, rtol=1e-4, atol=1e-6), f"{name}: the float64 weights are not the float32 ones"
    assert not torch.equal(w16, w32), f"{name}: bf16 weights are the float32 ones"
    assert bool(((w16 - w32).abs() <= SAFETY * d_w + SLACK).all()), f"{name}: {(w16 - w32).abs()} > {d_w}"
    if nontrivial:
        assert float((d_w / w.abs()).median()) < 0.5, f"{name}: the weights' bound is too loose to test anything"


def _alpha(model: Tiny, t: torch.Tensor, hw: int) -> torch.Tensor:
    return model.fc.weight.detach().double()[t] / hw  # ∂y_c/∂A_k at every pixel


def test_gradcam_in_bf16_within_the_bound(setup):
    model, x, t = setup
    ref, got = _maps(model, "gradcam", x, t)
    m = _magnitudes(model, x)
    alpha = _alpha(model, t, 64).abs()
    # S = ReLU(Σ α_k A_k): A within 6u·mA, α within 3u|α| (linear backward 2, pool backward 1)
    e = torch.einsum("bk,bkhw->bhw", alpha, 6 * U * m["mA"] + 3 * U * (m["A"] + 6 * U * m["mA"]))
    raw = torch.einsum("bk,bkhw->bhw", _alpha(model, t, 64), m["A"]).relu()
    _check("gradcam", ref, got, e.flatten(1).amax(1), raw)


def test_gradient_in_bf16_within_the_bound(setup):
    model, x, t = setup
    ref, got = _maps(model, "gradient", x, t)
    m = _magnitudes(model, x)
    w1, w2 = m["W1"].abs(), m["W2"].abs()
    e_z1, e_z2 = 3 * U * m["m1"], 6 * U * m["mA"]
    flip1, flip2 = m["z1"].abs() <= e_z1, m["z2"].abs() <= e_z2  # ReLU masks bf16 may set otherwise
    on1, on2 = (m["z1"] > 0) | flip1, (m["z2"] > 0) | flip2
    g = _alpha(model, t, 64).abs()[:, :, None, None].expand_as(m["z2"]) * (1 + 3 * U)
    d_g2, mag_g2 = on2 * 3 * U * g + flip2 * g, on2 * g
    d_v = F.conv_transpose2d(d_g2, w2, padding=1) + 2 * U * F.conv_transpose2d(mag_g2, w2, padding=1)
    mag_v = F.conv_transpose2d(mag_g2, w2, padding=1) * (1 + 2 * U)
    d_g1, mag_g1 = on1 * d_v + flip1 * mag_v, on1 * mag_v
    d_x = F.conv_transpose2d(d_g1, w1, padding=1) + 2 * U * F.conv_transpose2d(mag_g1, w1, padding=1)
    x64 = x.double().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_double(model)(x64).gather(1, t[:, None]).sum(), x64)
    # max_c |δx| moves by at most max_c |Δδx|
    _check("gradient", ref, got, d_x.amax(1).flatten(1).amax(1), grad.abs().amax(1))


def test_scorecam_in_bf16_within_the_bound(setup):
    model, x, t = setup
    ref, got = _maps(model, "scorecam", x, t, fold_batchnorm=True)  # exercises the float32 fold check
    m = _magnitudes(model, x)
    a, e_a = m["A"], 6 * U * m["mA"]
    flat, e_k = a.flatten(2), e_a.flatten(2).amax(2)
    r = flat.amax(2) - flat.amin(2)
    lo = flat.amin(2)[:, :, None, None]
    masks = torch.where(r[:, :, None, None] > 0, (a - lo) / r.clamp(min=1e-300)[:, :, None, None], 0.0)
    d_mask = torch.where(r > 2 * e_k, 4 * e_k / (r - 2 * e_k).clamp(min=1e-300), torch.ones_like(r)).clamp(max=1)
    b, k = r.shape
    masked_mag = x.double().abs()[:, None] * (masks + d_mask[:, :, None, None]).clamp(max=1)[:, :, None]
    d_in = x.double().abs()[:, None] * d_mask[:, :, None, None, None]
    d_s = 10 * U * _magnitudes(model, masked_mag.flatten(0, 1).float())["my"].view(b, k)
    d_s = d_s + _lipschitz(model, d_in.flatten(0, 1)).view(b, k)
    net = _double(model)
    logits = torch.stack([net(x.double() * masks[:, j, None]).gather(1, t[:, None])[:, 0] for j in range(k)], 1)
    w = logits.softmax(1)
    d_w = w * torch.expm1(2 * d_s.amax(1, keepdim=True))
    e = torch.einsum("bk,bkhw->bhw", d_w, a + e_a) + torch.einsum("bk,bkhw->bhw", w, e_a)
    _check("scorecam", ref, got, e.flatten(1).amax(1), torch.einsum("bk,bkhw->bhw", w, a).relu(), nontrivial=False)
    # the masks of these flat channels carry most of the bound (their span is small): only a sanity check here
    _check_weights("scorecam", *_weights(model, "scorecam", x, t), w, d_w, nontrivial=False)


def test_ablationcam_in_bf16_within_the_bound(setup):
    model, x, t = setup
    ref, got = _maps(model, "ablationcam", x, t)
    m = _magnitudes(model, x)
    a, e_a = m["A"], 6 * U * m["mA"]
    y = _double(model)(x.double()).detach().gather(1, t[:, None])[:, 0]
    w_c = model.fc.weight.detach().double()[t]
    n = w_c * a.mean(dim=(2, 3))  # y − y^(k) = W_ck · mean(A_k): w = n / y
    w = n / y[:, None]
    # ŷ and ŷ^(k) share every rounding but channel k's: its pooled value (7u·m), its weight (u), and the two
    # outputs of the linear layer (u|y| + u|y^(k)|); the denominator ŷ is within δ = 10u·M
    d_n = w_c.abs() * 8 * U * m["mA"].mean(dim=(2, 3)) + U * (y.abs()[:, None] + (y[:, None] - n).abs())
    d_y = 10 * U * m["my"]
    d_w = (d_n + w.abs() * d_y[:, None]) / (y.abs() - d_y).clamp(min=1e-300)[:, None]
    d_w = torch.where((y.abs() > d_y)[:, None], d_w, torch.full_like(d_w, math.inf))
    e = torch.einsum("bk,bkhw->bhw", d_w, a + e_a) + torch.einsum("bk,bkhw->bhw", w.abs(), e_a)
    raw = torch.einsum("bk,bkhw->bhw", w, a).relu()
    _check("ablationcam", ref, got, e.flatten(1).amax(1), raw, nontrivial=False)
    _check_weights("ablationcam", *_weights(model, "ablationcam", x, t), w, d_w)


def _prob_interval(p: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return p * torch.exp(-2 * d), (p * torch.exp(2 * d)).clamp(max=1)


def test_masking_metrics_in_bf16_within_the_bound(setup):
    model, x, t = setup
    norm = Normalization((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    raw = norm.invert(x).clamp(0, 1)
    xn = norm.apply(raw)
    maps = torch.rand(x.shape[0], 8, 8, generator=torch.Generator().manual_seed(1))
    res = {}
    for amp in (False, True):
        with autocast("cpu", amp):
            clean = clean_forward(model, raw, t, normalization=norm, pixels="raw")
            res[amp] = (
                confidence_metrics(model, clean, maps),
                insertion(model, clean, maps),
                deletion(model, clean, maps),
            )
    (c32, i32, d32), (c16, i16, d16) = res[False], res[True]
    for key in ("p", "o", "ad"):
        assert not torch.equal(c16[key], c32[key]), key
    assert not torch.equal(i16.curves, i32.curves) and not torch.equal(d16.curves, d32.curves)

    # AD, AG, AI: p and o within exp(±2δ); AD increases with p and decreases with o, AG the opposite
    p32, o32 = c32["p"].double(), c32["o"].double()
    p_lo, p_hi = _prob_interval(p32, 10 * U * SAFETY * _magnitudes(model, xn)["my"])
    masked = norm.apply(raw * maps[:, None])
    o_lo, o_hi = _prob_interval(o32, 10 * U * SAFETY * _magnitudes(model, masked)["my"])
    for key, lo, hi in (("p", p_lo, p_hi), ("o", o_lo, o_hi)):
        v = c16[key].double()
        assert bool(((v >= lo - SLACK) & (v <= hi + SLACK)).all()), key
    ad = lambda p, o: 100 * (p - o).clamp(min=0) / p  # noqa: E731
    ag = lambda p, o: torch.nan_to_num(100 * (o - p).clamp(min=0) / (1 - p))  # noqa: E731  (0/0 at p = 1)
    for key, lo, hi in (("ad", ad(p_lo, o_hi), ad(p_hi, o_lo)), ("ag", ag(p_hi, o_lo), ag(p_lo, o_hi))):
        v = c16[key].double()
        assert bool(((v >= lo - 1e-3) & (v <= hi + 1e-3)).all()), (key, v, lo, hi)
    decided = (o_lo > p_hi) | (o_hi < p_lo)
    assert bool(decided.any()) and torch.equal(c16["ai"][decided], c32["ai"][decided])

    # curves: every insertion image is, pixel by pixel, x or its blur (deletion: x or 0), so |image| ≤ bound
    for name, r32, r16, mag in (
        ("ins", i32, i16, torch.maximum(xn.abs(), gaussian_blur(xn).abs())),
        ("del", d32, d16, xn.abs()),
    ):
        d = 10 * U * SAFETY * _magnitudes(model, mag)["my"]
        point = r32.curves.double() * torch.expm1(2 * d)[:, None]
        assert bool(((r16.curves - r32.curves).abs() <= point + SLACK).all()), name
        n = point.shape[1] - 1
        auc = (point.sum(1) - point[:, 0] / 2 - point[:, -1] / 2) / n * 100
        assert bool(((r16.auc - r32.auc).abs() <= auc + 1e-4).all()), name


def test_evaluate_amp_records_the_precision_and_runs_bf16(setup, monkeypatch):
    model, x, _ = setup
    from igrad.data import Split

    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = (norm.invert(x).clamp(0, 1) * 255).round().to(torch.uint8)
    split = Split(images, model(norm.apply(images / 255)).argmax(1), [str(i) for i in range(5)])
    kw = dict(methods="gradcam,scorecam,ablationcam,gradient", target_layer="features", accuracy=False)
    fp32 = evaluate_model(model, split, normalization=norm, progress=False, **kw)
    bf16 = evaluate_model(model, split, normalization=norm, progress=False, amp=True, **kw)
    assert fp32["settings"]["amp"] is False and fp32["settings"]["precision"] == "float32"
    assert bf16["settings"]["amp"] is True and bf16["settings"]["precision"].startswith("bf16 autocast")
    assert fp32["per_sample"]["cos"] == bf16["per_sample"]["cos"]  # cos stays float32
    for m, d in fp32["per_sample"]["methods"].items():
        assert d["ins"] != bf16["per_sample"]["methods"][m]["ins"], m
        for k in ("ins", "del"):  # AUC ×100 of probabilities: the bound above is a few tenths here
            diff = (torch.tensor(d[k]) - torch.tensor(bf16["per_sample"]["methods"][m][k])).abs().max()
            assert float(diff) < 2.0, (m, k, float(diff))
    with pytest.raises(IgradError, match="amp must be true or false"):
        EvalConfig(amp="yes")  # type: ignore[arg-type]


def test_native_bf16_is_reported():
    assert isinstance(native_bf16("cpu"), bool)
