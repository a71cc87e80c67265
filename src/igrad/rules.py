"""Backward rules: the one place that changes how gradients flow through a model.

Two rules, both switched per backward pass over a *single* recorded forward graph:

* **Guided rectifier rule** (SPEC 1). For ReLU ``a = max(z, 0)`` the guided backward is
  ``δz = max(δa, 0) · 1[z > 0]``; for ReLU6 ``a = min(max(z, 0), 6)`` it is ``δz = max(δa, 0) · 1[0 < z < 6]``.
  Both equal the ordinary backward applied to ``max(δa, 0)``, so the rule is a gradient hook on the
  rectifier's *output* that clamps the incoming gradient at zero while the guided pass runs, and does
  nothing during any other pass. The same forward graph therefore serves the standard gradient
  (``create_graph=True``), the guided gradient, and the final ``loss.backward()``.
* **BatchNorm statistics rule** (SPEC 1, "statistics held constant"). In the ``batch-frozen`` mode a
  training-mode ``F.batch_norm`` runs the native kernel in an autograd function whose backward is
  ``δx = δy · γ / sqrt(σ²_B + ε)`` (statistics constant: per-sample gradients) during the input-gradient
  passes, and the exact train-mode backward during ``loss.backward()`` (so the cross-entropy still
  gets its true gradient). In the
  ``running`` mode every ``F.batch_norm`` uses the running statistics (eval-mode normalisation).

Rectifiers are recognised as *calls*, through a :class:`~torch.overrides.TorchFunctionMode`, so modules
(``nn.ReLU``, ``nn.ReLU6``, in-place or not) and functional forms (``F.relu``, ``torch.relu``,
``Tensor.relu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``, the in-place variants) are all covered without
touching the model: no module is replaced, no flag flipped, no hook registered on the model.
Any other non-linearity met during the forward raises :class:`UnsupportedActivationError`, unless
its name is in ``allow`` (then it keeps its ordinary backward).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .errors import IgradError, UnsupportedActivationError

__all__ = [
    "STATS_MODES",
    "Phase",
    "BackwardRules",
    "NONLINEARITIES",
    "preserve_batchnorm_counters",
]

#: Statistics modes for the regulariser's input-gradient passes (SPEC 1).
STATS_MODES = ("running", "batch-frozen", "coupled")


class Phase(enum.Enum):
    """Which backward pass is running over the recorded graph."""

    FREE = "free"  # ordinary autograd (e.g. the final loss.backward())
    STANDARD = "standard"  # the standard input gradient δx (statistics held constant)
    GUIDED = "guided"  # the guided input gradient δᴳx


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}
_RELU6_FUNCS = {F.relu6}

#: Non-linearities without a guided rule, by the name used in ``allow`` and error messages, with the
#: module classes that call them (for naming the culprit module).
NONLINEARITIES: dict[str, tuple[tuple[Callable[..., Any], ...], tuple[type[nn.Module], ...]]] = {
    "gelu": ((F.gelu,), (nn.GELU,)),
    "silu": ((F.silu,), (nn.SiLU,)),
    "hardswish": ((F.hardswish,), (nn.Hardswish,)),
    "hardsigmoid": ((F.hardsigmoid,), (nn.Hardsigmoid,)),
    "sigmoid": (
        (torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid),
        (nn.Sigmoid,),
    ),
    "tanh": ((torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh), (nn.Tanh,)),
    "elu": ((F.elu, F.elu_), (nn.ELU,)),
    "selu": ((F.selu, torch.selu, torch.selu_), (nn.SELU,)),
    "celu": ((F.celu, torch.celu, torch.celu_), (nn.CELU,)),
    "leaky_relu": ((F.leaky_relu, F.leaky_relu_), (nn.LeakyReLU,)),
    "prelu": ((F.prelu, torch.prelu), (nn.PReLU,)),
    "rrelu": ((F.rrelu, F.rrelu_), (nn.RReLU,)),
    "softplus": ((F.softplus,), (nn.Softplus,)),
    "mish": ((F.mish,), (nn.Mish,)),
    "logsigmoid": ((F.logsigmoid,), (nn.LogSigmoid,)),
    "softsign": ((F.softsign,), (nn.Softsign,)),
    "tanhshrink": ((F.tanhshrink,), (nn.Tanhshrink,)),
    "glu": ((F.glu,), (nn.GLU,)),
    "threshold": ((F.threshold, F.threshold_), (nn.Threshold,)),
    "hardtanh": ((), (nn.Hardtanh,)),  # F.hardtanh other than (0, 6); classified at call time
}

_OTHER_FUNCS: dict[Callable[..., Any], str] = {fn: name for name, (fns, _) in NONLINEARITIES.items() for fn in fns}


def _hardtanh_bounds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


@dataclass
class _State:
    phase: Phase = Phase.FREE


class BackwardRules(TorchFunctionMode):
    """Context manager that records a forward pass so it can be back-propagated with switchable rules.

    Use it around the forward call only, then run the backward passes inside :meth:`phase`::

        rules = BackwardRules(guided=True, stats="batch-frozen")
        with rules:
            logits = model(x)
        with rules.phase(Phase.GUIDED):
            g_guided, = torch.autograd.grad(score, x, retain_graph=True)

    Parameters
    ----------
    guided:
        register the guided rectifier rule (needed for any guided pass).
    stats:
        ``"running"``: training-mode ``batch_norm`` calls use the running statistics, as in eval mode
        (no statistics update). ``"batch-frozen"``: batch statistics, held constant in the
        input-gradient passes. ``"coupled"``: plain autograd (the samples of a batch are coupled
        through the batch statistics; kept only to demonstrate that failure).
    update_stats:
        whether ``batch-frozen`` updates the running statistics as ordinary training would.
    allow:
        names of non-linearities (see :data:`NONLINEARITIES`) to let through with their ordinary backward.
    model:
        optional, only used to name the offending module in error messages.
    """

    def __init__(
        self,
        *,
        guided: bool = False,
        stats: str = "running",
        update_stats: bool = False,
        allow: Iterable[str] = (),
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if stats not in STATS_MODES:
            raise IgradError(f"unknown statistics mode {stats!r}; choose one of {', '.join(STATS_MODES)}")
        self.guided = guided
        self.stats = stats
        self.update_stats = update_stats
        self.model = model
        self.allow = frozenset(a.lower() for a in allow)
        unknown = self.allow - set(NONLINEARITIES)
        if unknown:
            raise IgradError(
                f"unknown non-linearity name(s) in allow: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(NONLINEARITIES))}"
            )
        self._state = _State()
        self.rectifiers = 0  # rectifier calls seen (for diagnostics and tests)

    # -- hooks: they consult the shared state, so one recorded graph serves every pass -------------
    def _rectifier_hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        if self._state.phase is Phase.GUIDED:
            return grad.clamp(min=0)
        return None

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Run the backward passes inside this block with the rules of ``phase``."""
        previous, self._state.phase = self._state.phase, phase
        try:
            yield
        finally:
            self._state.phase = previous

    # -- the forward interception -------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return self._batch_norm(*args, **kwargs)
        rectifier = func in _RELU_FUNCS or func in _RELU6_FUNCS
        if func is F.hardtanh:
            rectifier = _hardtanh_bounds(args, kwargs) == (0.0, 6.0)
            if not rectifier:
                self._refuse("hardtanh", func)
        elif not rectifier and func in _OTHER_FUNCS:
            self._refuse(_OTHER_FUNCS[func], func)
        out = func(*args, **kwargs)
        if rectifier:
            self.rectifiers += 1
            if self.guided and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._rectifier_hook)
        return out

    def _refuse(self, name: str, func: Callable[..., Any]) -> None:
        if name in self.allow:
            return
        where = ""
        if self.model is not None:
            classes = NONLINEARITIES[name][1]
            names = [n for n, m in self.model.named_modules() if isinstance(m, classes)]
            if names:
                shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
                where = f" (module {shown}, {classes[0].__name__})"
        qual = f"{getattr(func, '__module__', None) or 'torch'}.{getattr(func, '__name__', func)}"
        raise UnsupportedActivationError(
            f"non-linearity {name!r} ({qual}){where} is on the gradient path, and guided backpropagation "
            f"is only defined for ReLU and ReLU6. Pass allow=[{name!r}] to keep its ordinary backward."
        )

    def _batch_norm(
        self,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        if not training or self.stats == "coupled":
            if training and not self.update_stats:
                running_mean = running_var = None  # batch statistics, no buffer update
            return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if self.stats == "running" and running_mean is not None and running_var is not None:
            return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
        # batch-frozen (also "running" for a BatchNorm without running statistics, whose eval mode
        # uses batch statistics too)
        update = self.update_stats and running_mean is not None and running_var is not None
        return _FrozenStatisticsBatchNorm.apply(
            input,
            weight,
            bias,
            running_mean if update else None,
            running_var if update else None,
            momentum,
            eps,
            self._state,
        )


class _FrozenStatisticsBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation whose backward rule depends on the phase.

    Forward: the native fused kernel, ``y = (x − μ_B) · γ / sqrt(σ²_B + ε) + β`` (running statistics
    updated as usual when given). Backward:

    * ``Phase.FREE`` (``loss.backward()``): the exact train-mode backward, through ``μ_B`` and ``σ²_B``;
    * ``Phase.STANDARD`` / ``Phase.GUIDED`` (the input-gradient passes): ``δx = δy · γ / sqrt(σ²_B + ε)``,
      the statistics held constant. Written with differentiable ops, so the standard pass taken with
      ``create_graph=True`` is differentiable in ``γ`` (and, through ``δy``, in every other parameter),
      while ``μ_B``, ``σ²_B`` stay constants: ``∇θ L_R`` is exact up to the held-constant statistics.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        state: _State,
    ) -> torch.Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.state, ctx.eps, ctx.has_bias = state, eps, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        none5 = (None,) * 5
        if ctx.state.phase is Phase.FREE:
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
            )
            return (gx, gw, gb, *none5)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else weight * invstd
        return (grad * scale.view(shape), None, None, *none5)


def has_training_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm module of ``model`` would normalise with batch statistics."""
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


@contextlib.contextmanager
def preserve_batchnorm_counters(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm ``num_batches_tracked`` counter on exit (a train-mode BatchNorm module
    increments it on every forward, even when igrad's rules leave the running statistics alone)."""
    saved = [
        (m.num_batches_tracked, m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
