"""The interpretable-gradient loss of docs/method.md §The loss: ``L = L_C + λ L_R``.

``L_R = (1/n) Σ_i E(δx_i, δᴳx_i)``: the error between each sample's standard input gradient ``δx_i``
(differentiable in the parameters, by double backpropagation) and its guided gradient ``δᴳx_i``
(a fixed target), computed over all C·H·W values. Used in any training loop as:

    criterion = GradientAlignmentLoss()
    l_r, logits = criterion(model, x, y)
    loss = F.cross_entropy(logits, y) + lam * l_r
    loss.backward()

``fraction=ρ < 1`` (the sub-batch regulariser, docs/method.md §The loss) takes ``L_R`` over a seeded subset of ``⌈ρ
n⌉`` samples
while ``logits`` (hence ``L_C``) cover the whole batch, so the regulariser's extra cost shrinks to about ρ of
the full one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import IgradError, unknown_name
from .gradients import SCORES, InputGradients, cosine_similarity, input_gradients
from .models import unwrap_model
from .output import model_logits, refuse_probabilities
from .rules import STATS_MODES, BackwardRules
from .torch_utils import has_training_batchnorm
from .validate import check_images

__all__ = ["ERRORS", "register_error", "GradientAlignmentLoss", "DEFAULT_STATS", "DEFAULT_LAMBDA", "training_forward"]

ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Error functions ``E(a, b) -> [B]`` over flattened per-sample gradients ``a, b`` of shape ``[B, D]``.
ERRORS: dict[str, ErrorFn] = {}

#: Default statistics mode for the regulariser's passes, chosen by measurement (docs/method.md §The loss): CIFAR
#: ResNet-18
#: at 1/4 width, real CIFAR-100, 300 steps of 128, λ = 0.75, same seed: eval-mode test cos 0.886 with
#: ``batch-frozen`` against 0.670 with ``running`` at equal accuracy (5.6 % vs 5.3 %; baseline 14.5 %,
#: cos 0.112), and one forward pass instead of two. ``results/stats_mode.json``; README, "Decisions".
DEFAULT_STATS = "batch-frozen"
#: Default weight λ of the regulariser, chosen on a validation split as docs/method.md §The loss asks (it deviates from
#: the
#: paper's 7.5e-3, which with the mean over the batch had no effect): CIFAR ResNet-18 at 1/4 width, CIFAR-100,
#: 10 % of the training set held out, 200 steps of 128, batch-frozen statistics. Validation accuracy /
#: eval-mode cos: λ = 0: 11.1 % / 0.083; 7.5e-3: 11.9 % / 0.079 (no effect); 7.5e-2: 11.2 % / 0.221;
#: 0.75: 5.2 % / 0.859. 7.5e-2 is the largest λ whose accuracy stays within a point of the baseline.
#: ``results/lambda_sweep.json``; README, "Decisions".
DEFAULT_LAMBDA = 7.5e-2


def register_error(name: str) -> Callable[[ErrorFn], ErrorFn]:
    """Decorator registering ``fn(a, b) -> per-sample error [B]`` under ``name`` for ``error=name``."""

    def deco(fn: ErrorFn) -> ErrorFn:
        if name in ERRORS:
            raise IgradError(f"error function {name!r} is already registered")
        ERRORS[name] = fn
        return fn

    return deco


@register_error("cosine")
def cosine_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − ⟨a, b⟩ / (‖a‖ ‖b‖ + ε)`` per row (ε: see :func:`igrad.gradients.cosine_similarity`)."""
    return 1 - cosine_similarity(a, b)


@register_error("mse")
def mse_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((a − b)²)`` per row."""
    return (a - b).square().mean(1)


@register_error("mae")
def mae_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean(|a − b|)`` per row."""
    return (a - b).abs().mean(1)


def training_forward(
    model: nn.Module, x: torch.Tensor, *, allow: Iterable[str] = ()
) -> tuple[torch.Tensor, BackwardRules]:
    """An ordinary training forward ``logits = model(x)`` ``[B, K]`` whose ``loss.backward()`` is exact (train-mode
    BatchNorm through the batch statistics, running statistics updated as usual), recorded by the backward-rule
    engine: each BatchNorm's batch statistics are kept (``rules.statistics``, for the sub-batch regulariser) and
    the convolutions' backward goes through the engine, whose bf16 input gradient of a strided grouped
    convolution avoids the CPU's slow native fallback (:func:`igrad.rules.strided_input_grad`). Nothing is
    refused in it (``x`` needs no gradient). Returns ``(logits, rules)``."""
    rules = BackwardRules(
        stats="batch-frozen", update_stats=True, allow=allow, model=unwrap_model(model), double_backward=True
    )
    rules.input = x
    with rules:
        logits = model_logits(model, x, probabilities=False)
    return logits, rules


class GradientAlignmentLoss(nn.Module):
    """``L_R = (1/n) Σ_i E(δx_i, δᴳx_i)``; ``criterion(model, x, target) -> (l_r, logits)``.

    ``logits`` are the training-mode logits for the cross-entropy. How many forward passes that takes
    depends on ``stats`` (docs/method.md §The loss, per-sample gradients with normalisation statistics held constant):

    * ``"batch-frozen"``: **one** forward serves ``L_C`` and both gradients; the input-gradient passes
      hold that forward's batch statistics constant, ``loss.backward()`` still sees exact train-mode
      BatchNorm for ``L_C``.
    * ``"running"``: the gradients are taken on a second forward that normalises with the running
      statistics (eval-mode normalisation, no statistics update); the first forward gives ``logits``.
      A model without training-mode BatchNorm needs only one forward.
    * ``"coupled"``: plain train-mode autograd through batch statistics: the samples are coupled and
      the loss learns to satisfy itself through that coupling. Kept only to show the failure.

    Parameters: ``error`` a name in :data:`ERRORS`; ``allow`` non-linearities without a guided rule to
    let through (see :mod:`igrad.rules`); ``fraction`` ρ in (0, 1], the sub-batch regulariser below;
    ``score`` what the gradients are taken of: ``"logit"`` ``y_c`` (docs/method.md §The loss) or ``"prob"``
    ``softmax(y)_c`` (an ablation; :data:`igrad.gradients.SCORES`).

    **Sub-batch regulariser** (``fraction=ρ < 1``, docs/method.md §The loss): ``logits`` come from one ordinary training
    forward over the whole batch (``L_C`` on all ``n`` samples, exact train-mode BatchNorm, running
    statistics updated once), and ``L_R = (1/k) Σ_{i∈S} E(δx_i, δᴳx_i)`` over a subset ``S`` of
    ``k = ⌈ρ n⌉`` samples, whose gradients are taken on a second forward of ``x[S]`` alone. That forward
    normalises with statistics held constant: with ``"batch-frozen"`` the **whole batch's** batch
    statistics recorded by the first forward (so each ``δx_i``, ``i ∈ S``, is the one ``ρ = 1`` gives
    for that sample), with ``"running"`` the running statistics. ``"coupled"`` has no constant
    statistics and is refused. ``S`` is the first ``k`` of ``torch.randperm(n, generator=generator)``
    (sorted): ``generator`` is the ``forward`` argument, or the default CPU generator when ``None``, so a
    trainer that seeds the step (``torch.manual_seed(f(seed, epoch, step))`` before the call, as
    ``igrad train`` does, or a generator seeded that way) draws the same subsets after resuming mid-epoch.

    The model runs in its own modes (``input_gradients(..., train=True)``). It must return logits
    ``[B, num_classes]`` (:mod:`igrad.output`); logits that look like probabilities are refused on the
    first call with each model (a check that costs a device synchronisation, so not every step).
    """

    def __init__(
        self,
        error: str = "cosine",
        *,
        stats: str = DEFAULT_STATS,
        allow: Iterable[str] = (),
        fraction: float = 1.0,
        score: str = "logit",
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise unknown_name("score", score, SCORES)
        if error not in ERRORS:
            raise unknown_name("error function", error, ERRORS)
        if stats not in STATS_MODES:
            raise unknown_name("statistics mode", stats, STATS_MODES)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise IgradError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if fraction < 1 and stats == "coupled":
            raise IgradError(
                "fraction < 1 holds the whole batch's normalisation statistics constant in the subset's passes; "
                "'coupled' has no constant statistics (use 'batch-frozen' or 'running')"
            )
        self.error = error
        self.stats = stats
        self.allow = tuple(allow)
        self.fraction = float(fraction)
        self.score = score
        self._checked: int | None = None  # id of the last model whose logits passed refuse_probabilities

    def extra_repr(self) -> str:
        fraction = f", fraction={self.fraction:g}" if self.fraction < 1 else ""
        score = f", score={self.score!r}" if self.score != "logit" else ""
        return f"error={self.error!r}, stats={self.stats!r}{fraction}{score}"

    def forward(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(L_R, logits)``; ``L_R`` is a scalar differentiable in the model's parameters.

        ``x`` ``[n, C, H, W]``, ``target`` ``[n]`` class indices; ``logits`` ``[n, K]`` (the whole batch);
        ``generator`` (a CPU generator) draws the subset when ``fraction < 1``. Raises
        :class:`IgradError` for bad images or targets and for a model that does not return logits.
        """
        if not isinstance(target, torch.Tensor):
            raise IgradError(f"target must be a LongTensor of class indices, got {type(target).__name__}")
        if self.fraction < 1:
            return self._subset_loss(model, x, target, generator)
        two_passes = self.stats == "running" and has_training_batchnorm(unwrap_model(model))
        logits = model_logits(model, x, probabilities=False) if two_passes else None
        res = input_gradients(
            unwrap_model(model) if two_passes else model,
            x,
            target,
            create_graph=True,
            stats=self.stats,
            update_stats=not two_passes,
            allow=self.allow,
            parameter_path=not two_passes,
            train=True,
            score=self.score,
        )
        logits = res.logits if logits is None else logits
        return self._error(model, res, logits), logits

    def _error(self, model: nn.Module, res: InputGradients, logits: torch.Tensor) -> torch.Tensor:
        """The mean error over the samples of ``res``, computed in float32 (or float64) whatever the
        autocast precision of the passes; refuses probability-valued ``logits`` once per model."""
        if self._checked != id(model):
            refuse_probabilities(logits, model)
            self._checked = id(model)
        a, b = res.standard.flatten(1), res.guided.flatten(1)  # type: ignore[union-attr]
        dtype = torch.promote_types(a.dtype, torch.float32)
        with torch.autocast(a.device.type, enabled=False):
            return ERRORS[self.error](a.to(dtype), b.to(dtype)).mean()

    def subset(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The sorted indices ``[⌈ρ n⌉]`` of the samples ``L_R`` is taken on (all ``n`` when ``ρ = 1``)."""
        k = math.ceil(self.fraction * n - 1e-9)  # ρ n within rounding of an integer counts as that integer
        if k >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=generator)[: max(k, 1)].sort().values

    def _subset_loss(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``L_R`` on a subset of the batch, ``logits`` of the whole batch (the sub-batch regulariser)."""
        check_images(x)
        if target.shape != (len(x),):
            raise IgradError(f"target must have shape [{len(x)}] (one class per sample), got {tuple(target.shape)}")
        net = unwrap_model(model)
        logits, rules = training_forward(model, x, allow=self.allow)
        statistics = rules.statistics if self.stats == "batch-frozen" and has_training_batchnorm(net) else None
        idx = self.subset(len(x), generator).to(x.device)
        res = input_gradients(
            net,
            x[idx],
            target[idx],
            create_graph=True,
            stats=self.stats,
            allow=self.allow,
            parameter_path=False,
            train=True,
            score=self.score,
            statistics=statistics,
        )
        return self._error(model, res, logits), logits
