"""Pictures of saliency maps: overlays, and the grid figure of the paper's qualitative comparison.

* CAM-family maps ``[H, W]`` in [0, 1] are drawn with the JET colour map blended on the image,
  ``rgb = (1 − α) · jet(S) + α · image`` (``α = 0.5``, as pytorch-grad-cam's ``show_cam_on_image``).
* Signed gradients (``gradient``, ``guided``, ``smoothgrad``, ``guided-gradcam``) are drawn alone with a
  diverging colour map (``RdBu_r``: red positive, blue negative, white 0) of
  :func:`igrad.saliency.signed_map` (the channel of largest magnitude, scaled to [-1, 1]).
* :func:`qualitative_figure`: rows = images (one row per model for each image when several models are
  given: baseline row, then regularised row), columns = the input image, then one per method.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend) and written
atomically as PNG.
"""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from .atomic import atomic_write_bytes
from .errors import IgradError
from .normalization import Normalization
from .output import model_logits
from .saliency import METHODS, create_method, resolve_methods, signed_map
from .torch_utils import eval_mode
from .validate import TargetLike, check_images, resolve_target

__all__ = [
    "Explanation",
    "class_label",
    "denormalize",
    "cam_overlay",
    "signed_image",
    "render",
    "explain",
    "method_options",
    "explanation_figure",
    "qualitative_figure",
    "save_figure",
    "save_image",
]

CAM_CMAP = "jet"
SIGNED_CMAP = "RdBu_r"


@dataclass
class Explanation:
    """The display maps of one method for a batch: ``[B, H, W]``, in [0, 1] (``signed=False``) or in
    [-1, 1] (``signed=True``), with the target classes they explain."""

    method: str
    maps: torch.Tensor
    signed: bool
    target: torch.Tensor


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Raw pixels in [0, 1] of normalised images ``[B, C, H, W]``: ``clamp(x · std + mean, 0, 1)``
    (:meth:`igrad.normalization.Normalization.invert`)."""
    return Normalization.of(mean, std).invert(x, clamp=True)


def _rgb(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> ``[H, W, 3]`` float array (grey images repeated)."""
    a = image.detach().float().cpu()
    if a.shape[0] == 1:
        a = a.expand(3, -1, -1)
    return a[:3].permute(1, 2, 0).numpy()


def cam_overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.5, cmap: str = CAM_CMAP) -> np.ndarray:
    """``(1 − α) · jet(cam) + α · image`` as an ``[H, W, 3]`` array in [0, 1]; ``image`` ``[C, H, W]`` and
    ``cam`` ``[H, W]`` both in [0, 1]."""
    heat = colormaps[cmap](cam.detach().float().cpu().clamp(0, 1).numpy())[..., :3]
    return ((1 - alpha) * heat + alpha * _rgb(image)).clip(0, 1)


def signed_image(signed: torch.Tensor, cmap: str = SIGNED_CMAP) -> np.ndarray:
    """A signed map ``[H, W]`` in [-1, 1] through a diverging colour map (0 is the middle colour)."""
    v = (signed.detach().float().cpu().clamp(-1, 1).numpy() + 1) / 2
    return colormaps[cmap](v)[..., :3]


def render(explanation: Explanation, images: torch.Tensor, i: int) -> np.ndarray:
    """The picture of sample ``i``: a diverging map for signed methods, else a JET overlay on ``images[i]``
    (raw pixels in [0, 1])."""
    if explanation.signed:
        return signed_image(explanation.maps[i])
    return cam_overlay(images[i], explanation.maps[i])


def method_options(name: str, **options: Any) -> dict[str, Any]:
    """The subset of ``options`` (e.g. ``batch_size``) that saliency method ``name`` accepts."""
    params = inspect.signature(METHODS[name]).parameters
    return {k: v for k, v in options.items() if k in params}


def explain(
    model: nn.Module,
    x: torch.Tensor,
    target: TargetLike,
    methods: Sequence[str],
    *,
    target_layer: nn.Module | str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Explanation]:
    """Display maps of every method in ``methods`` for the normalised images ``x``.

    ``target``: as in :func:`igrad.gradient` (``None``: the model's predicted class, resolved once so
    that every method explains the same class). ``target_layer`` is used by the methods that read a layer.
    """
    check_images(x)
    methods = resolve_methods(methods)
    method_kwargs = method_kwargs or {}
    with torch.no_grad(), eval_mode(model):
        t = resolve_target(target, model_logits(model, x))
    out = {}
    for name in methods:
        layer = target_layer if METHODS[name].uses_layer else None
        with create_method(name, model, layer, **dict(method_kwargs.get(name, {}))) as m:
            if m.signed:
                out[name] = Explanation(name, signed_map(m.attribute(x, t)), True, t)
            else:
                out[name] = Explanation(name, m(x, t), False, t)
    return out


def class_label(c: int, class_names: Sequence[str] | None) -> str:
    """The name of class ``c`` in ``class_names``, or ``"class c"`` where there is none (no names, or ``c`` out
    of their range)."""
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else f"class {c}"


def explanation_figure(
    images: torch.Tensor,
    rows: Sequence[tuple[str, Mapping[str, Explanation]]],
    *,
    class_names: Sequence[str] | None = None,
    cell: float = 1.6,
    title: str | None = None,
    predictions: Mapping[str, torch.Tensor] | None = None,
    true_labels: torch.Tensor | None = None,
) -> Figure:
    """A grid: one row per ``(label, explanations)`` entry of ``rows`` and image (rows of the same image are
    adjacent), columns = the input image, then the methods in the order of the first entry.

    ``images`` holds raw pixels ``[B, C, H, W]`` in [0, 1]. Each row is labelled with its ``label`` and the
    class its maps explain ("explains: ..."); with ``predictions`` (per row label, the model's predicted classes
    ``[B]``) also with that model's prediction ("pred: ..."), and with ``true_labels`` ``[B]`` the true class
    ("true: ...") in place of the explained one (the caller explains the true class, or says so in the title).
    Raises :class:`IgradError` when ``rows`` is empty or a class tensor is not ``[B]``.
    """
    if not rows:
        raise IgradError("nothing to draw: no rows")
    methods = list(rows[0][1])
    n_img = images.shape[0]
    given = [("true_labels", true_labels), *((f"predictions[{k!r}]", v) for k, v in (predictions or {}).items())]
    for what, t in given:
        if t is not None and tuple(t.shape) != (n_img,):
            raise IgradError(f"{what} must hold one class per image [{n_img}], got shape {tuple(t.shape)}")
    nrows, ncols = n_img * len(rows), 1 + len(methods)
    fig = Figure(figsize=(cell * ncols + 0.8, cell * nrows + (0.5 if title else 0.2)), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for i in range(n_img):
        for r, (label, exps) in enumerate(rows):
            row = i * len(rows) + r
            ax = axes[row, 0]
            ax.imshow(_rgb(images[i]), interpolation="nearest")
            c = int(next(iter(exps.values())).target[i]) if exps else None
            if true_labels is not None:
                text = f"{label}\ntrue: {class_label(int(true_labels[i]), class_names)}"
            else:
                text = label if c is None else f"{label}\nexplains: {class_label(c, class_names)}"
            if predictions is not None and label in predictions:
                text += f"\npred: {class_label(int(predictions[label][i]), class_names)}"
            ax.set_ylabel(text, fontsize=8)
            for j, name in enumerate(methods, start=1):
                ax = axes[row, j]
                exp = exps[name]
                ax.imshow(render(exp, images, i), interpolation="nearest")
                if row == 0:
                    ax.set_title(name, fontsize=9)
    axes[0, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def qualitative_figure(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    targets: TargetLike,
    methods: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    path: str | os.PathLike[str] | None = None,
    *,
    target_layer: str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    labels: torch.Tensor | None = None,
) -> Figure:
    """The paper's qualitative figure: for each image, one row per model (e.g. ``{"baseline": m0,
    "regularised": m1}``, in that order), columns = the image, then each method's map. Each row is
    labelled with the model, the true class when ``labels`` (the images' true classes ``[B]``) are given,
    else the class its maps explain, and the model's predicted class.

    ``images`` are the models' normalised inputs ``[B, C, H, W]`` (``mean``/``std`` recover the raw
    pixels for display); ``targets`` as in :func:`igrad.gradient`, the same classes for every model
    (``None``: each model's own predicted class). Written as PNG to ``path`` when given.
    """
    if not models:
        raise IgradError("qualitative_figure needs at least one model")
    check_images(images)
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != images.shape[0]):
        raise IgradError(f"labels must be [B] = [{images.shape[0]}] true classes, got shape {list(labels.shape)}")
    raw = denormalize(images, mean, std)
    rows = [
        (label, explain(model, images, targets, methods, target_layer=target_layer, method_kwargs=method_kwargs))
        for label, model in models.items()
    ]
    predictions = {}
    for label, model in models.items():
        with torch.no_grad(), eval_mode(model):
            predictions[label] = model_logits(model, images).argmax(1)
    fig = explanation_figure(
        raw, rows, class_names=class_names, title=title, predictions=predictions, true_labels=labels
    )
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> None:
    """Write ``fig`` as PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def save_image(path: str | os.PathLike[str], rgb: np.ndarray, scale: int = 1) -> None:
    """Write an ``[H, W, 3]`` array in [0, 1] as PNG, atomically, enlarged ``scale`` times (nearest)."""
    from matplotlib.image import imsave

    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    imsave(buf, np.ascontiguousarray(rgb.clip(0, 1)), format="png")
    atomic_write_bytes(path, buf.getvalue())
