"""Saliency metrics of docs/method.md §Metrics: Average Drop / Gain / Increase and RISE insertion / deletion.

Notation: ``x`` the model's normalised input ``[B, C, H, W]``, ``raw`` its [0, 1] pixels (``x =
norm(raw)``, :class:`igrad.normalization.Normalization`), ``S`` the saliency maps ``[B, H, W]``, ``c``
the target class of each sample, ``p`` the class-``c`` softmax probability on ``x``.

* :func:`confidence_metrics`: ``o`` the same probability on ``norm(raw ⊙ S)`` (the map multiplies
  the raw [0, 1] pixels, all channels alike, and the result is normalised), then per sample
  ``ad = 100·max(0, p − o)/p``, ``ag = 100·max(0, o − p)/(1 − p)``, ``ai = 100·1[o > p]``.
* :func:`insertion` / :func:`deletion`: pixels ranked by decreasing ``S`` (ties by position), ``s``
  pixels per step, ``n = ceil(HW/s)`` steps, ``n + 1`` points; AUC ``(Σa − a₀/2 − a_n/2)/n·100``.

Every function returns per-sample values (the metric over N images is their mean, see
:func:`summarize`) and runs batched: the perturbed images of many samples and steps are packed into
forward batches of ``batch_size`` under :func:`torch.inference_mode`, with BatchNorm/dropout in eval
mode (the model's modes are restored afterwards). The model must return logits ``[B, num_classes]``
(pre-softmax): every forward goes through :func:`igrad.output.model_logits`, so a tuple, a dict or
probabilities (a model ending in softmax, which would be soft-maxed twice) raise :class:`IgradError`.
The names of :data:`METRICS` feed the CLI. A model with a single logit (``num_classes = 1``) is refused by
every probability-based score (AD, AG, AI, and the curves with ``score="prob"``): the soft-max of one logit is
1 whatever the input, so the map would not matter (:func:`check_scorable`); its curves can be scored by the
logit (``score="logit"``), or the model given two logits ``[0, z]``.

Each batch is validated and forwarded once (:func:`clean_forward`: model input, raw pixels, logits,
target); the metrics take that :class:`CleanBatch` (or compute it themselves when given images), so
``p`` and the clean points of the curves are never forwarded again. Images may be given raw
(``pixels="raw"``, with the model's ``normalization``) or normalised (the model's input; the raw
pixels are then ``normalization.invert(x)``).

Precision: inside :func:`igrad.precision.autocast` (``igrad evaluate --amp``) the model's forwards run in
bf16; the scores (softmax of the logits cast to float32), the substrates, the masked and perturbed images
and all metric arithmetic stay float32 (double for AD/AG/AI). Images keep their dtype throughout: a float64
model given float64 images is run on float64 masked and perturbed images, and its scores, curves and values
are float64 (float32 otherwise). Give the clean forward the same precision
as the metrics, so that a curve's clean point and ``p`` come from the same function as the perturbed ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IgradError, unknown_name
from .normalization import Normalization, resolve_normalization
from .output import model_logits, refuse_single_logit
from .precision import full_precision
from .stats import summarize  # re-exported: its home is igrad.stats
from .torch_utils import eval_mode
from .validate import TargetLike, check_images, check_target, parse_names, positive_int, resolve_target

__all__ = [
    "Metric",
    "METRICS",
    "SUBSTRATES",
    "SCORES",
    "PIXELS",
    "CleanBatch",
    "CurveResult",
    "MetricResults",
    "clean_forward",
    "confidence_metrics",
    "insertion",
    "deletion",
    "causal_curves",
    "compute_metrics",
    "check_scorable",
    "resolve_metrics",
    "gaussian_blur",
    "blur_kernel",
    "summarize",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SubstrateFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A metric of the registry: its name (CLI), title (tables), and which direction is better."""

    name: str
    title: str
    higher_is_better: bool
    kind: str  # "confidence" (from confidence_metrics) or "curve" (insertion/deletion)
    description: str


#: The metric registry (also the choices of ``igrad evaluate --metrics``), in table order.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ad", "AD", False, "confidence", "Average Drop: 100·max(0, p − o)/p"),
        Metric("ag", "AG", True, "confidence", "Average Gain: 100·max(0, o − p)/(1 − p)"),
        Metric("ai", "AI", True, "confidence", "Average Increase: 100·1[o > p]"),
        Metric("ins", "Insertion", True, "curve", "RISE insertion AUC ×100 (blurred substrate)"),
        Metric("del", "Deletion", False, "curve", "RISE deletion AUC ×100 (zero substrate)"),
    )
}


def resolve_metrics(spec: str | Iterable[str]) -> list[str]:
    """Metric names from ``"all"``, a comma-separated string or a sequence (:func:`igrad.validate.parse_names`,
    case-insensitive); unknown names raise."""
    return parse_names(spec, METRICS, "metric", fold_case=True)


# --------------------------------------------------------------------------------------------------
# scores and substrates


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: bf16 logits (autocast) in float32, float64 ones kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the metrics' values for images ``x``: float32, or float64 for float64 images."""
    return torch.promote_types(x.dtype, torch.float32)


def _softmax_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)_target`` ``[m]``; a model with a single logit is refused (its soft-max is 1 whatever
    the input, so every map would score the same: :func:`igrad.output.refuse_single_logit`)."""
    refuse_single_logit(logits, "the class probability p (AD, AG, AI; insertion and deletion with score='prob')")
    return _widened(logits).softmax(dim=1).gather(1, target[:, None])[:, 0]


def _logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _widened(logits).gather(1, target[:, None])[:, 0]


#: Scores of a curve point: ``fn(logits [m, K], target [m]) -> [m]``.
SCORES: dict[str, ScoreFn] = {"prob": _softmax_prob, "logit": _logit}


def blur_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """The ``size×size`` kernel ``k(i, j) ∝ exp(−((i−r)² + (j−r)²)/(2σ²))``, ``r = size//2``, Σk = 1."""
    r = (size - 1) / 2
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - r) ** 2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Each channel of ``x`` convolved with :func:`blur_kernel` (zero padding, same size): the
    insertion substrate of docs/method.md §Metrics (RISE), applied to the normalised image."""
    c = x.shape[1]
    k = blur_kernel(size, sigma).to(device=x.device, dtype=x.dtype)
    return F.conv2d(x, k.expand(c, 1, size, size), padding=size // 2, groups=c)


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


#: Substrates (what removed pixels become / what insertion starts from), on the normalised image.
#: ``zero``: 0 in normalised space (the data set's mean colour); ``blur``: :func:`gaussian_blur`;
#: ``mean``: the image's own per-channel mean. A callable ``fn(x) -> tensor like x`` is accepted too.
SUBSTRATES: dict[str, SubstrateFn] = {"zero": torch.zeros_like, "blur": gaussian_blur, "mean": _channel_mean}


def _substrate(spec: str | SubstrateFn, x: torch.Tensor) -> torch.Tensor:
    if callable(spec):
        fn = spec
    elif isinstance(spec, str) and spec in SUBSTRATES:
        fn = SUBSTRATES[spec]
    else:
        raise unknown_name("substrate", str(spec), SUBSTRATES)
    out = fn(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise IgradError(f"substrate must return a tensor shaped like x {tuple(x.shape)}, got {shape}")
    if not bool(torch.isfinite(out).all()):
        raise IgradError("substrate returned non-finite values")
    return out.to(x.dtype)


def _score_fn(spec: str | ScoreFn) -> ScoreFn:
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec in SCORES:
        return SCORES[spec]
    raise unknown_name("score", str(spec), SCORES)


# --------------------------------------------------------------------------------------------------
# validation and batched forwards


def _check_maps(maps: object, x: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """Validate saliency maps for images ``x``: ``[B, H, W]`` floats, finite (and in [0, 1] if ``unit``)."""
    b, _, h, w = x.shape
    if not isinstance(maps, torch.Tensor):
        raise IgradError(f"maps must be a torch.Tensor of shape [B, H, W] = [{b}, {h}, {w}], got {type(maps).__name__}")
    if tuple(maps.shape) != (b, h, w):
        hint = " (squeeze the channel dimension: maps[:, 0])" if maps.dim() == 4 and maps.shape[1] == 1 else ""
        raise IgradError(
            f"maps must have shape [B, H, W] = [{b}, {h}, {w}] to match x {tuple(x.shape)}, "
            f"got {tuple(maps.shape)}{hint}"
        )
    if not maps.is_floating_point():
        maps = maps.float()
    finite = torch.isfinite(maps)
    if not bool(finite.all()):
        bad = sorted({int(i) for i in (~finite).flatten(1).any(1).nonzero()[:, 0].tolist()})
        raise IgradError(f"maps contain NaN or inf values (samples {bad[:10]}{'...' if len(bad) > 10 else ''})")
    if unit and (float(maps.min()) < -1e-6 or float(maps.max()) > 1 + 1e-6):
        raise IgradError(
            f"maps must lie in [0, 1] (they multiply the raw pixels), got range "
            f"[{float(maps.min()):.4g}, {float(maps.max()):.4g}]; min-max normalise them first"
        )
    if unit:
        maps = maps.clamp(0, 1)
    return maps.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------------
# the clean forward: model input, raw pixels, logits, target


#: How the images given to the metrics are expressed: ``normalised`` (the model's input) or ``raw``
#: (pixels in [0, 1]; the model's input is ``normalization.apply(raw)``).
PIXELS = ("normalised", "raw")


@dataclass(frozen=True)
class CleanBatch:
    """One batch as every metric needs it, from a single clean forward (:func:`clean_forward`).

    ``x``: the model's input ``[B, C, H, W]`` (normalised); ``raw``: its raw [0, 1] pixels (``None``
    without a normalisation: then the masking metrics cannot run); ``logits``: ``f(x)`` ``[B, K]``;
    ``target``: the class of each sample ``[B]`` (long; the prediction where none was given);
    ``normalization``: the model's, or ``None``.
    """

    x: torch.Tensor
    raw: torch.Tensor | None
    logits: torch.Tensor
    target: torch.Tensor
    normalization: Normalization | None

    def score(self, score: str | ScoreFn = "prob") -> torch.Tensor:
        """The unperturbed score of each sample ``[B]`` (float32, float64 for a float64 model; CPU); ``prob``:
        ``p = softmax(f(x))_c``."""
        return _widened(_score_fn(score)(self.logits, self.target)).cpu()


def _normalization(
    normalization: Normalization | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Normalization | None:
    """``normalization``, one built from ``mean``/``std`` (the older keywords), or ``None`` (neither)."""
    if normalization is None and mean is None and std is None:
        return None
    return resolve_normalization(normalization, mean, std)


def _model_input(
    x: object, normalization: Normalization | None, pixels: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(model input, raw pixels or None)`` of validated images ``x`` expressed as ``pixels``."""
    if pixels not in PIXELS:
        raise unknown_name("pixels", str(pixels), PIXELS)
    x = check_images(x, "raw pixels" if pixels == "raw" else "x")
    if normalization is not None and x.shape[1] != normalization.channels:
        raise IgradError(
            f"the normalisation has one value per channel ({normalization.channels}), but the images have "
            f"{x.shape[1]} channels"
        )
    if pixels == "normalised":
        return x, (normalization.invert(x) if normalization is not None else None)
    if normalization is None:
        raise IgradError("pixels='raw' needs the model's normalization= (Normalization(mean, std))")
    return normalization.apply(x), x


def clean_forward(
    model: nn.Module,
    x: torch.Tensor,
    target: TargetLike = None,
    *,
    normalization: Normalization | None = None,
    pixels: str = "normalised",
    logits: torch.Tensor | None = None,
    batch_size: int = 64,
) -> CleanBatch:
    """Validate a batch once and forward it once: a :class:`CleanBatch` for :func:`compute_metrics`.

    ``x`` ``[B, C, H, W]`` holds normalised images (``pixels="normalised"``, the model's input; the raw
    pixels are ``normalization.invert(x)`` when a normalisation is given) or raw [0, 1] pixels
    (``pixels="raw"``; the model's input is ``normalization.apply(x)``). ``logits`` ``[B, K]``, when the
    caller already has ``f(x)``, are used instead of a forward (then ``batch_size`` images at a time,
    eval mode, no gradient). ``target``: class indices ``[B]``, an ``int``, or ``None`` (the prediction).
    Raises :class:`IgradError` on bad images, channel counts, logits or targets.
    """
    x, raw = _model_input(x, normalization, pixels)
    batch_size = positive_int("batch_size", batch_size)
    t = check_target(target, x.shape[0], x.device)
    if logits is None:
        with eval_mode(model), torch.no_grad():  # not inference_mode: the targets may feed autograd later
            logits = torch.cat([model_logits(model, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    elif not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise IgradError(f"logits must have shape [B, num_classes] with B = {x.shape[0]}, got {got}")
    logits = logits.detach()
    return CleanBatch(x, raw, logits, resolve_target(t, logits), normalization)


def _clean(
    model: nn.Module,
    x: torch.Tensor | CleanBatch,
    target: TargetLike,
    normalization: Normalization | None,
    pixels: str,
    logits: torch.Tensor | None,
    batch_size: int,
) -> CleanBatch:
    if isinstance(x, CleanBatch):
        return x
    return clean_forward(
        model, x, target, normalization=normalization, pixels=pixels, logits=logits, batch_size=batch_size
    )


# --------------------------------------------------------------------------------------------------
# Average Drop / Gain / Increase


def confidence_metrics(
    model: nn.Module,
    x: torch.Tensor | CleanBatch,
    maps: torch.Tensor,
    target: TargetLike = None,
    *,
    normalization: Normalization | None = None,
    pixels: str = "normalised",
    logits: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-sample ``p``, ``o``, ``ad``, ``ag``, ``ai`` (docs/method.md §Metrics), each a float tensor ``[B]`` on CPU.

    ``p = softmax(f(x))_c``, ``o = softmax(f(norm(raw ⊙ S)))_c`` (``S`` ``[B, H, W]`` in [0, 1],
    broadcast over channels, multiplies the raw [0, 1] pixels); ``p`` and ``o`` are probabilities.
    Then ``ad = 100·max(0, p − o)/p``, ``ag = 100·max(0, o − p)/(1 − p)``, ``ai = 100·1[o > p]``, so
    that AD, AG and AI over a set of images are the means of these values. A zero denominator
    (``p = 0`` in ``ad``, ``p = 1`` in ``ag``) has a zero numerator; its term is 0.

    The images: ``x`` normalised (the model's input; ``raw = normalization.invert(x)``) or, with
    ``pixels="raw"``, the raw pixels themselves; or a :class:`CleanBatch` (:func:`clean_forward`, which
    then also gives the target and ``p``). ``normalization`` (or the older ``mean=``/``std=``) is
    required. ``logits``: ``f(x)`` when already computed. ``target``: class indices ``[B]`` (an ``int``
    for all; ``None``: the predicted class). Masked images are forwarded ``batch_size`` at a time.
    """
    clean = _clean(model, x, target, _normalization(normalization, mean, std), pixels, logits, batch_size)
    return _confidence(model, clean, maps, positive_int("batch_size", batch_size))


def _confidence(model: nn.Module, clean: CleanBatch, maps: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    norm = clean.normalization
    if norm is None or clean.raw is None:
        raise IgradError("the masking metrics (AD, AG, AI) need the model's normalization= (or mean= and std=)")
    maps = _check_maps(maps, clean.x, unit=True)
    o_parts = []
    with eval_mode(model), torch.inference_mode():
        for i in range(0, clean.x.shape[0], batch_size):
            masked = norm.apply(clean.raw[i : i + batch_size] * maps[i : i + batch_size, None])
            logits = model_logits(model, masked)
            o_parts.append(_softmax_prob(logits, resolve_target(clean.target[i : i + batch_size], logits)))
    p = clean.score("prob").double()
    o = torch.cat(o_parts).double().cpu()
    zero = torch.zeros_like(p)
    ad = 100 * torch.where(p > 0, (p - o).clamp(min=0) / p.clamp(min=torch.finfo(p.dtype).tiny), zero)
    ag = 100 * torch.where(p < 1, (o - p).clamp(min=0) / (1 - p).clamp(min=torch.finfo(p.dtype).tiny), zero)
    ai = 100 * (o > p).double()
    dtype = _result_dtype(clean.x)  # float32, or float64 for float64 images
    return {k: v.to(dtype) for k, v in {"p": p, "o": o, "ad": ad, "ag": ag, "ai": ai}.items()}


# --------------------------------------------------------------------------------------------------
# insertion / deletion


class CurveResult(NamedTuple):
    """Result of :func:`insertion` / :func:`deletion`: ``auc`` ``[B]`` (×100) and ``curves`` ``[B, n+1]``."""

    auc: torch.Tensor
    curves: torch.Tensor


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """``rank[b, q]`` = position of pixel ``q`` (row-major) in the order of decreasing saliency,
    ties broken by pixel position (the earlier pixel first)."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def _num_steps(hw: int, width: int, step: int | None) -> tuple[int, int]:
    pixels = positive_int("step", step, optional=True)
    pixels = width if pixels is None else pixels  # None: the image width
    return pixels, math.ceil(hw / pixels)


def causal_curves(
    model: nn.Module,
    start: torch.Tensor,
    end: torch.Tensor,
    maps: torch.Tensor,
    target: torch.Tensor,
    *,
    step: int,
    batch_size: int = 64,
    score: str | ScoreFn = "prob",
    known: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores ``a[b, k]``, ``k = 0..n``, of the images that take the ``min(k·s, HW)`` most salient
    pixels (all channels) from ``end`` and the others from ``start``; ``[B, n+1]`` float on CPU.

    The ``B·(n+1)`` images are built on the fly, chunk by chunk, and forwarded ``batch_size`` at a
    time, so a forward batch mixes steps and samples. ``known = (k, scores [B])``: the point ``k`` is
    already known (the clean image's score at deletion's ``k = 0`` or insertion's ``k = n``) and is not
    forwarded. (Low-level: inputs are not validated here.)
    """
    b, c, h, w = start.shape
    hw = h * w
    n = math.ceil(hw / step)
    ranks = _ranks(maps)
    score_fn = _score_fn(score)
    out = torch.empty(b, n + 1, dtype=_result_dtype(start))
    skip = -1 if known is None else int(known[0])
    if known is not None:
        out[:, skip] = known[1].to(out.dtype).cpu()
    per = n + 1 - (known is not None)  # forwarded points per sample
    total = b * per
    for lo in range(0, total, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, total), device=start.device)
        sample, k = idx // per, idx % per
        if known is not None:
            k = k + (k >= skip).long()
        changed = ranks[sample] < (k * step).clamp(max=hw)[:, None]  # [m, HW]
        images = torch.where(changed.view(-1, 1, h, w), end[sample], start[sample])
        logits = model_logits(model, images)
        values = score_fn(logits, resolve_target(target[sample], logits))
        if not isinstance(values, torch.Tensor) or values.shape != (len(idx),):
            got = getattr(values, "shape", type(values).__name__)
            raise IgradError(f"score must return one value per image [{len(idx)}], got {got}")
        out[sample.cpu(), k.cpu()] = values.to(out.dtype).cpu()
    return out


def _auc(curves: torch.Tensor) -> torch.Tensor:
    """``(Σ_k a_k − a_0/2 − a_n/2)/n × 100`` per row (trapezoid rule with spacing 1/n)."""
    n = curves.shape[1] - 1
    c = curves.double()
    return ((c.sum(1) - c[:, 0] / 2 - c[:, -1] / 2) / n * 100).to(curves.dtype)


def _causal_metric(
    mode: str,
    model: nn.Module,
    clean: CleanBatch,
    maps: torch.Tensor,
    step: int | None,
    batch_size: int,
    substrate: str | SubstrateFn,
    score: str | ScoreFn,
) -> CurveResult:
    x = clean.x
    maps = _check_maps(maps, x)
    batch_size = positive_int("batch_size", batch_size)
    step, n = _num_steps(x.shape[2] * x.shape[3], x.shape[3], step)
    known = (0 if mode == "deletion" else n, clean.score(score))  # the clean image's point
    with eval_mode(model), torch.inference_mode():
        with full_precision(x.device):
            base = _substrate(substrate, x)
        start, end = (x, base) if mode == "deletion" else (base, x)
        curves = causal_curves(
            model, start, end, maps, clean.target, step=step, batch_size=batch_size, score=score, known=known
        )
    return CurveResult(_auc(curves), curves)


def deletion(
    model: nn.Module,
    x: torch.Tensor | CleanBatch,
    maps: torch.Tensor,
    target: TargetLike = None,
    *,
    step: int | None = None,
    batch_size: int = 64,
    substrate: str | SubstrateFn = "zero",
    score: str | ScoreFn = "prob",
    normalization: Normalization | None = None,
    pixels: str = "normalised",
    logits: torch.Tensor | None = None,
) -> CurveResult:
    """RISE deletion (docs/method.md §Metrics): per sample, the scores ``a_k`` of ``x`` with its ``min(k·s, HW)`` most
    salient pixels (decreasing ``S``, ties by position, all channels) replaced by the substrate
    (default ``zero``: 0 in normalised space), ``k = 0..n``, ``n = ceil(HW/s)``, ``s = step`` (default:
    the image width). Returns ``(auc, curves)``: ``auc = (Σa − a₀/2 − a_n/2)/n·100`` ``[B]`` (lower is
    better) and ``curves`` ``[B, n+1]``. ``score``: ``prob`` (class-``c`` softmax probability),
    ``logit``, or ``fn(logits, target) -> [m]``.
    Images ``x`` (normalised, raw with ``pixels="raw"``, or a :class:`CleanBatch`), ``target``
    (``None``: the prediction), ``normalization`` and ``logits`` as in :func:`clean_forward`; the
    clean image's point of the curve comes from its one clean forward.
    """
    clean = _clean(model, x, target, normalization, pixels, logits, positive_int("batch_size", batch_size))
    return _causal_metric("deletion", model, clean, maps, step, batch_size, substrate, score)


def insertion(
    model: nn.Module,
    x: torch.Tensor | CleanBatch,
    maps: torch.Tensor,
    target: TargetLike = None,
    *,
    step: int | None = None,
    batch_size: int = 64,
    substrate: str | SubstrateFn = "blur",
    score: str | ScoreFn = "prob",
    normalization: Normalization | None = None,
    pixels: str = "normalised",
    logits: torch.Tensor | None = None,
) -> CurveResult:
    """RISE insertion (docs/method.md §Metrics): per sample, the scores ``a_k`` of the substrate (default ``blur``:
    :func:`gaussian_blur` of the normalised image, 11×11, σ = 5, zero padding) with the
    ``min(k·s, HW)`` most salient pixels of ``x`` put back, ``k = 0..n``. Same ranking, steps, scores
    and AUC as :func:`deletion`; higher is better. Returns ``(auc, curves)``.
    Images ``x`` (normalised, raw with ``pixels="raw"``, or a :class:`CleanBatch`), ``target``
    (``None``: the prediction), ``normalization`` and ``logits`` as in :func:`clean_forward`; the
    clean image's point of the curve comes from its one clean forward.
    """
    clean = _clean(model, x, target, normalization, pixels, logits, positive_int("batch_size", batch_size))
    return _causal_metric("insertion", model, clean, maps, step, batch_size, substrate, score)


# --------------------------------------------------------------------------------------------------
# all metrics at once, and aggregation


def check_scorable(clean: CleanBatch, metrics: Iterable[str], score: str | ScoreFn = "prob") -> None:
    """Refuse, before any forward, metrics that would score a one-logit model by its soft-max probability
    (always 1: :func:`igrad.output.refuse_single_logit`): AD, AG and AI, and insertion/deletion with
    ``score="prob"``. ``metrics``: names of :data:`METRICS`."""
    names = list(metrics)
    uses_prob = any(METRICS[n].kind == "confidence" for n in names)
    uses_prob |= score == "prob" and any(METRICS[n].kind == "curve" for n in names)
    if uses_prob:
        refuse_single_logit(clean.logits, f"the class probability p of the metrics {', '.join(names)}")


@dataclass
class MetricResults:
    """Per-sample values ``values[name]`` ``[B]`` and curves ``curves["ins"|"del"]`` ``[B, n+1]``."""

    values: dict[str, torch.Tensor]
    curves: dict[str, torch.Tensor]


def compute_metrics(
    model: nn.Module,
    x: torch.Tensor | CleanBatch,
    maps: torch.Tensor,
    target: TargetLike = None,
    metrics: str | Iterable[str] = "all",
    *,
    normalization: Normalization | None = None,
    pixels: str = "normalised",
    logits: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    step: int | None = None,
    batch_size: int = 64,
    substrates: tuple[str | SubstrateFn, str | SubstrateFn] = ("blur", "zero"),
    score: str | ScoreFn = "prob",
) -> MetricResults:
    """The metrics named in ``metrics`` (see :data:`METRICS`) for one batch, with docs/method.md §Metrics defaults;
    ``substrates``: insertion's and deletion's (:data:`SUBSTRATES`); ``score``: the curves' points
    (:data:`SCORES`; AD/AG/AI always use the probability). The images (validated and
    forwarded once for all the metrics) as in :func:`clean_forward`, or a :class:`CleanBatch`."""
    names = resolve_metrics(metrics)
    batch_size = positive_int("batch_size", batch_size)
    clean = _clean(model, x, target, _normalization(normalization, mean, std), pixels, logits, batch_size)
    check_scorable(clean, names, score)
    values: dict[str, torch.Tensor] = {}
    curves: dict[str, torch.Tensor] = {}
    if any(METRICS[n].kind == "confidence" for n in names):
        conf = _confidence(model, clean, maps, batch_size)
        values.update({n: conf[n] for n in names if METRICS[n].kind == "confidence"})
    for name, mode, substrate in (("ins", "insertion", substrates[0]), ("del", "deletion", substrates[1])):
        if name in names:
            res = _causal_metric(mode, model, clean, maps, step, batch_size, substrate, score)
            values[name], curves[name] = res.auc, res.curves
    return MetricResults({n: values[n] for n in names}, curves)
