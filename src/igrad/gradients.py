"""Input gradients of a classifier: standard ``δx = ∂y_c/∂x`` and guided ``δᴳx`` (docs/method.md §The loss).

Every function here is batch-native (one forward, one backward per gradient kind for the whole batch)
and non-mutating: the model's modules, flags, hooks, training mode and buffers are as before the
call, also when it raises. By default the model is explained as it is used at inference: every module
is in eval mode for the call (Dropout off, BatchNorm with its running statistics); ``train=True``
(the training loss's use) runs it in its own modes. The backward rules live in :mod:`igrad.rules`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import NamedTuple, NoReturn

import torch
from torch import nn

from .errors import IgradError, unknown_name
from .models import uncompiled
from .output import model_logits, refuse_probabilities, refuse_single_logit
from .rules import BackwardRules, Phase
from .torch_utils import autograd_mode, autograd_ready, eval_mode, preserve_batchnorm_counters
from .validate import TargetLike, check_images, resolve_target

__all__ = ["gradient", "input_gradients", "InputGradients", "gradient_cosine", "cosine_similarity", "SCORES"]

#: What the input gradient is taken of: ``logit`` ``y_c`` (docs/method.md §The loss, the default everywhere) or ``prob``
#: ``p_c = softmax(y)_c`` (another reading of the paper; the trade-off study's ablation). For ``prob`` the backward
#: starts from ``∂p_c/∂y = p_c (e_c - p)`` (float32 or wider) and both passes share it: the guided rules act inside the
#: network only, so ``δᴳx`` is guided backpropagation of ``p_c``.
SCORES = ("logit", "prob")


class InputGradients(NamedTuple):
    """The result of :func:`input_gradients`."""

    logits: torch.Tensor  # [B, K], from the forward the gradients were taken on
    target: torch.Tensor  # [B] class indices used
    standard: torch.Tensor | None  # δx, shaped like x
    guided: torch.Tensor | None  # δᴳx, shaped like x (always detached)


def input_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: TargetLike = None,
    *,
    standard: bool = True,
    guided: bool = True,
    create_graph: bool = False,
    guided_graph: bool = False,
    stats: str = "running",
    update_stats: bool = False,
    allow: Iterable[str] = (),
    parameter_path: bool = True,
    train: bool = False,
    statistics: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    score: str = "logit",
) -> InputGradients:
    """Standard and/or guided input gradients of ``y_target`` from **one** forward pass.

    ``δx_i = ∂ y_{i, c_i} / ∂ x_i`` for every sample ``i`` (the logit, pre-softmax). Because samples
    only interact through BatchNorm batch statistics, which every ``stats`` mode except ``coupled``
    holds constant, ``∂ Σ_i y_{i,c_i} / ∂ x`` computed in one backward is exactly the per-sample
    gradient. ``create_graph=True`` records the standard pass for double backpropagation; the guided
    pass never does (it is a fixed target).

    ``train=False`` (default): the model as used at inference, every module in eval mode for the call
    (Dropout off, BatchNorm with running statistics; each module's flag restored afterwards, also on
    error), and logits that look like probabilities are refused (:func:`igrad.output.model_logits`).
    ``train=True``: the model in its own modes, as a training loss needs it (Dropout active,
    training-mode BatchNorm treated per ``stats``); the logits' values are not inspected (no device
    synchronisation). With ``update_stats=False`` (the default) a training-mode model's BatchNorm
    buffers and counters are left untouched. ``parameter_path=False`` declares that ``logits`` will
    feed no loss (only the gradients will): a later ``backward()`` then skips the forward graph (ignored
    for ``score="prob"`` with ``create_graph``, whose gradients depend on the logits).
    ``statistics`` (with ``stats="batch-frozen"``): the batch statistics a forward on a larger batch
    recorded (:attr:`igrad.rules.BackwardRules.statistics`), held constant here instead of this batch's
    own (the sub-batch regulariser's passes on a subset of that batch). ``score``: ``"logit"`` (docs/method.md §The
    loss) or
    ``"prob"``: the gradients of ``p_{i,c_i} = softmax(y_i)_{c_i}`` instead (see :data:`SCORES`).

    Works inside a caller's ``torch.inference_mode()`` (left for the call; ``x`` is copied out of it), with
    the same results as outside. Raises :class:`~igrad.errors.IgradError` for bad images or targets, an
    unknown ``score``, a model that does not return logits ``[B, num_classes]``, a model that runs
    TorchScript (:func:`igrad.models.refuse_scripted`), and logits that do not depend on ``x`` through
    autograd (a forward that calls ``.detach()`` or runs under ``torch.no_grad()``).
    """
    check_images(x)
    if score not in SCORES:
        raise unknown_name("score", score, SCORES)
    model = uncompiled(model)  # the rules record an eager forward (same parameters)
    # the probability's seed p_c (e_c - p) depends on the logits: a loss of the gradient reaches θ through them
    parameter_path = parameter_path or (score == "prob" and create_graph)
    rules = BackwardRules(
        stats=stats,
        update_stats=update_stats,
        allow=allow,
        model=model,
        double_backward=create_graph or guided_graph,
        parameter_path=parameter_path,
        statistics=statistics,
    )
    keep = contextlib.nullcontext() if update_stats else preserve_batchnorm_counters(model)
    mode = contextlib.nullcontext() if train else eval_mode(model)
    # autograd_mode: also inside a caller's torch.inference_mode(), with x copied out of it
    with mode, keep, autograd_mode():
        xg = autograd_ready(x).detach().requires_grad_(True)
        rules.input = xg
        with rules:
            logits = model_logits(model, xg, probabilities=False)
        rules.check_replayed()
        if not train:
            refuse_probabilities(logits, model)
        t = resolve_target(target, logits)
        if score == "prob":
            refuse_single_logit(logits, "the probability score (score='prob')")
            # in float32 at least (bf16 logits under autocast), float64 kept
            scores = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(1)
        else:
            scores = logits
        total = scores.gather(1, t[:, None]).sum()
        if not total.requires_grad:
            _graph_cut(model)
        g_guided = g_standard = None
        if guided:
            with rules.phase(Phase.GUIDED):
                (g_guided,) = torch.autograd.grad(
                    total,
                    xg,
                    create_graph=guided_graph,
                    retain_graph=standard or create_graph or guided_graph,
                    allow_unused=True,
                )
            if g_guided is None:
                _graph_cut(model)
        if standard:
            with rules.phase(Phase.STANDARD):
                (g_standard,) = torch.autograd.grad(
                    total, xg, create_graph=create_graph, retain_graph=create_graph, allow_unused=True
                )
            if g_standard is None:
                _graph_cut(model)
    return InputGradients(logits, t, g_standard, g_guided)


def _graph_cut(model: nn.Module) -> NoReturn:
    """Raise the error for logits that do not depend on the input through autograd."""
    raise IgradError(
        f"the logits of {type(model).__name__} do not depend on its input x through autograd: its forward cuts "
        "the graph (a .detach(), a block under torch.no_grad() or torch.inference_mode(), or a non-differentiable "
        "operation between x and the logits), so igrad cannot take input gradients; remove the cut from forward"
    )


def gradient(
    model: nn.Module,
    x: torch.Tensor,
    target: TargetLike = None,
    *,
    guided: bool = False,
    create_graph: bool = False,
    stats: str = "running",
    allow: Iterable[str] = (),
    train: bool = False,
) -> torch.Tensor:
    """The input gradient ``∂ y_target / ∂ x`` per sample, shaped like ``x`` ``[B, C, H, W]``.

    ``target``: a LongTensor ``[B]`` of class indices, an ``int`` for all samples, or ``None`` for
    each sample's arg-max class. ``guided=True`` applies the guided rule of docs/method.md §The loss at every rectifier
    (``δz = max(δa, 0)·1[z > 0]`` for ReLU, ``·1[0 < z < 6]`` for ReLU6). The model is explained as
    used at inference: every module in eval mode for the call (Dropout off, BatchNorm with its running
    statistics), modes restored afterwards. ``train=True`` keeps the model's own modes; ``stats`` then
    chooses how training-mode BatchNorm is treated (``"running"``, ``"batch-frozen"``, ``"coupled"``:
    see :class:`igrad.rules.BackwardRules`). Non-linearities other than ReLU/ReLU6 raise unless named
    in ``allow``, for both kinds of gradient, so that the two are always computed on the same footing.
    ``create_graph=True`` records the backward pass for higher-order derivatives. The model must return
    logits ``[B, num_classes]`` (:func:`igrad.output.model_logits`), else :class:`~igrad.errors.IgradError`.
    """
    res = input_gradients(
        model,
        x,
        target,
        standard=not guided,
        guided=guided,
        create_graph=create_graph and not guided,
        guided_graph=create_graph and guided,
        stats=stats,
        allow=allow,
        train=train,
    )
    return res.guided if guided else res.standard  # type: ignore[return-value]


def gradient_cosine(
    model: nn.Module,
    x: torch.Tensor,
    target: TargetLike = None,
    *,
    stats: str = "running",
    allow: Iterable[str] = (),
    train: bool = False,
) -> torch.Tensor:
    """Per-sample ``cos(δx, δᴳx)`` over all C·H·W values, ``[B]`` (see :func:`cosine_similarity`).

    The diagnostic of docs/method.md §The loss, measured on the model in eval mode (modes restored afterwards) unless
    ``train=True`` (see :func:`gradient`). Raises :class:`~igrad.errors.IgradError` as :func:`gradient`.
    """
    res = input_gradients(model, x, target, stats=stats, allow=allow, train=train)
    return cosine_similarity(res.standard, res.guided)  # type: ignore[arg-type]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``⟨a, b⟩ / (‖a‖ ‖b‖ + ε)`` over all non-batch dimensions, ``[B]``.

    ``ε`` is the dtype's smallest normal number: input gradients of a network at initialisation
    can have norms around 1e-9, where a fixed ``ε = 1e-12`` would dominate ``‖a‖ ‖b‖`` and report a
    cosine near 0 whatever the directions. A zero vector gives 0.
    """
    a, b = a.flatten(1), b.flatten(1)
    eps = torch.finfo(a.dtype).tiny
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
