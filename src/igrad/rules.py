"""Backward rules: the one place that changes how gradients flow through a model.

A :class:`BackwardRules` context records a forward pass whose backward rules are switched per
*pass* (a :class:`Phase`), so that a single recorded forward graph serves the guided gradient, the
standard gradient (with ``create_graph=True``) and the final ``loss.backward()``:

* **Guided rectifier rule** (docs/method.md §The loss). ReLU ``a = max(z, 0)``: ``δz = max(δa, 0) · 1[z > 0]``;
  ReLU6 ``a = min(max(z, 0), 6)``: ``δz = max(δa, 0) · 1[0 < z < 6]`` in the guided pass, and the
  ordinary ``δz = δa · mask`` otherwise. The mask is saved as a boolean constant, so the standard
  pass's recorded graph does not lead back into the forward graph.
* **BatchNorm statistics rule** (docs/method.md §The loss, "statistics held constant"). In the input-gradient passes
  ``δx = δy · γ / sqrt(σ² + ε)`` with the statistics constant (per-sample gradients): the batch
  statistics of this forward (``batch-frozen``) or the running ones (``running``). In
  ``loss.backward()`` the exact backward of the normalisation that ran (train-mode for
  ``batch-frozen``, so the cross-entropy gets its true gradient).
* **Convolution double backward**: for the standard pass taken with ``create_graph=True`` a cheaper
  exact double backward built on the native weight-gradient kernel (see :class:`_Conv2d`).
* **Reduced precision and layout**: under autocast every pass stays in the autocast dtype
  (convolutions cast as autocast does; the BatchNorm rule scales in the gradient's dtype) and in the
  tensors' own memory layout; the input gradient of a strided grouped convolution in bf16/fp16 on the
  CPU, a slow native fallback, goes through the exact stride-1 route of :func:`strided_input_grad`.
* **Recorded statistics** (the sub-batch regulariser, docs/method.md §The loss): a ``batch-frozen`` forward records its
  batch statistics (:attr:`BackwardRules.statistics`); a forward of a subset of that batch replays them
  as constants (``statistics=``).

Everything is recognised as *calls*, through a :class:`~torch.overrides.TorchFunctionMode`, so modules
(``nn.ReLU``, ``nn.ReLU6``, ``nn.Threshold(0, 0)``, ``nn.Hardtanh(0, 6)``, in-place or not) and functional
forms (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``, ``torch.clamp`` /
``torch.clip`` / ``clamp_min`` with bounds ``(0, None)`` or ``(0, 6)``, ``F.threshold(x, 0, 0)``, the in-place
variants) are all covered without touching the model: no module is replaced, no flag flipped, no hook
registered on the model. Every other call whose result lies on the gradient path (differentiable and
depending on the input) must be in the allow-list of :mod:`igrad.calls` (linear maps, products, pooling,
shape operations, dropout, per-sample normalisations, which keep their ordinary backward); anything else
raises :class:`UnsupportedActivationError` naming the function and the module that called it, unless its
name is in ``allow`` (then it keeps its ordinary backward). Calls off the path (shape queries, integer and
boolean results, computations of the parameters alone or under ``no_grad``) pass untouched.

A forward the mode cannot see is never recorded without the rules: a submodule compiled with
``torch.compile`` runs its eager forward inside the block (``torch.compiler.set_stance("force_eager")``),
and a model that runs TorchScript anywhere is refused (:func:`igrad.models.refuse_scripted`).
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .calls import (
    DIVISIONS,
    INPLACE,
    NOT_A_RECTIFIER,
    PASS,
    RECTIFIER_FORMS,
    allow_name,
    known_short_names,
    qualified_name,
    rectifier_upper,
)
from .errors import IgradError, UnsupportedActivationError
from .models import refuse_scripted
from .torch_utils import eager_compiled

__all__ = [
    "STATS_MODES",
    "Phase",
    "BackwardRules",
]

#: Statistics modes for the regulariser's input-gradient passes (docs/method.md §The loss).
STATS_MODES = ("running", "batch-frozen", "coupled")

_PASS_BUT_CONV2D = PASS - {F.conv2d}


class Phase(enum.Enum):
    """Which backward pass is running over the recorded graph."""

    FREE = "free"  # ordinary autograd (e.g. the final loss.backward())
    STANDARD = "standard"  # the standard input gradient δx (statistics held constant)
    GUIDED = "guided"  # the guided input gradient δᴳx


@dataclass
class _State:
    phase: Phase = Phase.FREE
    # False when the recorded forward feeds nothing but the input-gradient passes: loss.backward() then
    # reaches its activations only through rectifier masks and constant statistics (zero derivative),
    # so its rules skip that work instead of back-propagating zeros through the whole network.
    parameter_path: bool = True


#: What a refused soft-max most often means: the model returns probabilities (docs/method.md §Metrics needs logits).
_PROBABILITY_HINTS = {
    name: f" If the model's forward ends in {name}, it returns {kind}: igrad needs logits (pre-softmax), so "
    f"remove the final {name} from the model (or wrap it in a module that returns the layer before it)."
    for name, kind in (("softmax", "probabilities"), ("log_softmax", "log-probabilities"))
}


class BackwardRules(TorchFunctionMode):
    """Context manager that records a forward pass so it can be back-propagated with switchable rules.

    Use it around the forward call only, then run the backward passes inside :meth:`phase`:

        rules = BackwardRules(stats="batch-frozen")
        with rules:
            logits = model(x)
        with rules.phase(Phase.GUIDED):
            g_guided, = torch.autograd.grad(score, x, retain_graph=True)

    Parameters
    ----------
    stats:
        ``"running"``: training-mode ``batch_norm`` calls use the running statistics, as in eval mode
        (no statistics update). ``"batch-frozen"``: batch statistics, held constant in the
        input-gradient passes. ``"coupled"``: plain autograd (the samples of a batch are coupled
        through the batch statistics; kept only to demonstrate that failure).
    update_stats:
        whether ``batch-frozen`` updates the running statistics as ordinary training would.
    allow:
        names of functions without a guided rule to let through with their ordinary backward, as the
        error refusing them names them (``"gelu"``, ``"silu"``, ``"sigmoid"``, ``"softmax"``, ``"pow"``,
        ``"clamp"``, ...; see :func:`igrad.calls.allow_name`).
    model:
        optional: names the offending module in error messages, and is checked to run no TorchScript
        (:func:`igrad.models.refuse_scripted`: the rules cannot see inside a TorchScript graph).
    double_backward:
        the standard pass will be taken with ``create_graph=True``: use the cheaper exact convolution
        double backward and route eval-mode BatchNorm through the constant-statistics rule.
    parameter_path:
        ``False`` when this forward's output feeds no loss directly (only the input gradients taken on
        it do): ``loss.backward()`` then skips the forward graph, whose contribution is exactly zero.
    statistics:
        the batch statistics another ``batch-frozen`` forward recorded (its :attr:`statistics`), for a
        forward on a *subset* of that batch (the sub-batch regulariser, docs/method.md §The loss): the k-th
        training-mode
        normalisation normalises with the k-th recorded ``(μ, 1/sqrt(σ² + ε))`` as constants (no
        statistics update), so the subset's passes hold the whole batch's statistics constant. Requires
        ``stats="batch-frozen"``; a forward that normalises more often, or other channel counts, than the
        recorded one raises :class:`IgradError`.

    After a ``batch-frozen`` forward without ``statistics``, :attr:`statistics` holds the batch statistics
    ``(μ, 1/sqrt(σ² + ε))`` of each of its training-mode normalisations, in call order.
    """

    def __init__(
        self,
        *,
        stats: str = "running",
        update_stats: bool = False,
        allow: Iterable[str] = (),
        model: nn.Module | None = None,
        double_backward: bool = False,
        parameter_path: bool = True,
        statistics: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.double_backward = double_backward
        if stats not in STATS_MODES:
            raise IgradError(f"unknown statistics mode {stats!r}; choose one of {', '.join(STATS_MODES)}")
        if statistics is not None and stats != "batch-frozen":
            raise IgradError(f"recorded statistics are replayed in 'batch-frozen' mode only, not {stats!r}")
        if model is not None:
            refuse_scripted(model, "igrad's backward rules (gradients, the regulariser)")
        self.stats = stats
        self.update_stats = update_stats
        self.model = model
        self.allow = _check_allow(allow)
        self._state = _State(parameter_path=parameter_path)
        self._eager: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        self.input: torch.Tensor | None = None  # the leaf the input gradients are taken for, if known
        self.rectifiers = 0  # rectifier calls seen (for diagnostics and tests)
        # batch-frozen: recorded here in call order, or replayed from another forward's record
        self.statistics: list[tuple[torch.Tensor, torch.Tensor]] = [] if statistics is None else statistics
        self._replay = statistics is not None
        self._replayed = 0
        # the calls with a rule of their own, and the allow-list (minus the convolution when it has one)
        self._handlers = _HANDLERS_DOUBLE if double_backward else _HANDLERS
        self._pass = _PASS_BUT_CONV2D if double_backward else PASS

    def __enter__(self) -> BackwardRules:
        # compiled submodules run their eager forward inside the block, so that the mode sees their calls
        self._eager = eager_compiled()
        self._eager.__enter__()
        try:
            super().__enter__()
        except BaseException:
            self._eager.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._eager.__exit__(*exc)

    # -- hooks: they consult the shared state, so one recorded graph serves every pass -------------
    def _conv2d(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        if isinstance(padding, str) or not (input.requires_grad or weight.requires_grad):
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        conf = (_pair(stride), _pair(padding), _pair(dilation), groups)
        device = input.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would, so every kernel sees one dtype
            dtype = torch.get_autocast_dtype(device)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        # the leaf the input gradients are taken for: loss.backward() never needs its gradient
        leaf = input is self.input
        return _Conv2d.apply(input, weight, bias, conf, self._state, leaf)

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
        if func in self._pass:  # most calls: linear maps, shape operations, queries
            return func(*args, **kwargs)
        handler = self._handlers.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs)
        return self._unknown(func, args, kwargs)

    def _unknown(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a function the engine has no rule for; refuse it if its result is on the gradient path
        (differentiable and depending on the input) unless it is allowed."""
        out = func(*args, **kwargs)
        if torch.is_grad_enabled() and _requires_grad(out):
            name = allow_name(func)
            if name.lower() not in self.allow and self._reaches_input(out):
                raise UnsupportedActivationError(
                    f"{name!r} ({qualified_name(func)}){_calling_module(self.model)} is on the gradient path, "
                    "but guided backpropagation is only defined for ReLU and ReLU6 (linear, pooling and shape "
                    f"operations pass unchanged) and igrad knows no rule for it. Pass allow=[{name!r}] to "
                    f"keep its ordinary backward.{_PROBABILITY_HINTS.get(name.lower(), '')}"
                )
        return out

    def _reaches_input(self, out: Any) -> bool:
        """Whether the autograd graph of ``out`` leads back to :attr:`input` (``True`` when no input is
        set): results of the parameters alone are constants for the input gradients. Walked only for
        results of unknown functions, before refusing them."""
        tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
        if self.input is None or any(t is self.input for t in tensors):
            return True
        stack: list[Any] = [t.grad_fn for t in tensors if t.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if getattr(node, "variable", None) is self.input:
                return True
            stack.extend(n for n, _ in node.next_functions)
        return False

    def _rectifier(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call that may be written a rectifier: ReLU/ReLU6 get the guided rule, other bounds are
        non-linearities without one."""
        x, lo, hi, inplace = RECTIFIER_FORMS[func](args, kwargs)
        upper = rectifier_upper(lo, hi)
        if upper is NOT_A_RECTIFIER:
            return self._unknown(func, args, kwargs)
        self.rectifiers += 1
        if not isinstance(x, torch.Tensor) or not x.requires_grad or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        return _Rectifier.apply(x, upper, inplace or func in INPLACE, self._state)

    def _division(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``x / c`` is linear; a divisor on the gradient path (a reciprocal) or a rounding mode is not."""
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        on_path = isinstance(divisor, torch.Tensor) and divisor.requires_grad and torch.is_grad_enabled()
        if kwargs.get("rounding_mode") is None and not (on_path and self._reaches_input(divisor)):
            return func(*args, **kwargs)
        return self._unknown(func, args, kwargs)

    def _batch_norm_call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._batch_norm(*args, **kwargs)

    def _torch_batch_norm_call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
        cudnn_enabled)``, the lower-level form, routed through the same rule as ``F.batch_norm``."""
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        a = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        return self._batch_norm(
            a["input"],
            a["running_mean"],
            a["running_var"],
            a["weight"],
            a["bias"],
            a["training"],
            a["momentum"],
            a["eps"],
        )

    def _sync_batch_norm(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # SyncBatchNorm's synchronised path (training under torch.distributed, world > 1): its own
        # autograd function couples the samples of all processes and has no double backward
        raise IgradError(
            "SyncBatchNorm with synchronised statistics (training under torch.distributed) is not "
            "supported by the backward rules: the statistics modes need each process's own BatchNorm "
            "(use nn.BatchNorm2d; igrad train's DDP keeps per-process statistics)"
        )

    def _conv2d_call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self._conv2d(*args, **kwargs)

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
        have_running = running_mean is not None and running_var is not None
        if not training:  # eval-mode normalisation: constants already
            if not self.double_backward:
                return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
            return self._constant_statistics(input, weight, bias, running_mean, running_var, momentum, eps)
        if self.stats == "coupled":
            if not self.update_stats:
                running_mean = running_var = None  # batch statistics, no buffer update
            return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
        if self.stats == "running" and have_running:
            return self._constant_statistics(input, weight, bias, running_mean, running_var, momentum, eps)
        if self._replay:
            return self._replay_statistics(input, weight, bias, momentum, eps)
        # batch-frozen (also "running" for a BatchNorm without running statistics, whose eval mode
        # uses batch statistics too)
        update = self.update_stats and have_running
        return _Normalize.apply(
            input,
            weight,
            bias,
            running_mean if update else None,
            running_var if update else None,
            True,
            momentum,
            eps,
            self._state,
            self.statistics,
        )

    def _replay_statistics(
        self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float, eps: float
    ) -> torch.Tensor:
        """Normalise with the next recorded batch statistics, held constant (eval-mode normalisation)."""
        k, self._replayed = self._replayed, self._replayed + 1
        if k >= len(self.statistics) or self.statistics[k][0].shape[0] != input.shape[1]:
            got = f"{input.shape[1]} channels" if k < len(self.statistics) else "no recorded statistics"
            raise IgradError(
                f"normalisation {k + 1} of this forward does not match the recorded forward ({got}): the "
                "subset's forward must run the same normalisations as the whole batch's"
            )
        mean, invstd = self.statistics[k]
        var = invstd.pow(-2) - eps  # the batch's biased variance, as 1/sqrt(var + eps) gives invstd back
        return self._constant_statistics(input, weight, bias, mean, var, momentum, eps)

    def _constant_statistics(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor | None,
        var: torch.Tensor | None,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        """Normalise with the given statistics, constants in every pass (eval-mode normalisation)."""
        return _Normalize.apply(input, weight, bias, mean, var, False, momentum, eps, self._state, None)

    def check_replayed(self) -> None:
        """Raise :class:`IgradError` unless a replaying forward used every recorded statistic."""
        if self._replay and self._replayed != len(self.statistics):
            raise IgradError(
                f"this forward normalised {self._replayed} times, the recorded forward {len(self.statistics)} times: "
                "the subset's forward must run the same normalisations as the whole batch's"
            )


_Handler = Callable[[BackwardRules, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
_HANDLERS: dict[Callable[..., Any], _Handler] = {
    **dict.fromkeys(RECTIFIER_FORMS, BackwardRules._rectifier),
    **dict.fromkeys(DIVISIONS, BackwardRules._division),
    F.batch_norm: BackwardRules._batch_norm_call,
    torch.batch_norm: BackwardRules._torch_batch_norm_call,
    torch.batch_norm_stats: BackwardRules._sync_batch_norm,
}
_HANDLERS_DOUBLE: dict[Callable[..., Any], _Handler] = {**_HANDLERS, F.conv2d: BackwardRules._conv2d_call}


def _check_allow(allow: Iterable[str]) -> frozenset[str]:
    """``allow`` as a set of lower-case names, checked: each a name errors give functions (a qualified
    name such as ``mypkg.op`` for functions outside torch is taken as it is)."""
    if isinstance(allow, str):
        raise IgradError(f"allow must be a list of names, e.g. allow=[{allow!r}], not a string")
    names = frozenset(str(a).lower() for a in allow)
    unknown = sorted(n for n in names if "." not in n and n not in known_short_names())
    if unknown:
        close = difflib.get_close_matches(unknown[0], known_short_names(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise IgradError(
            f"unknown function name {unknown[0]!r} in allow.{hint} Use the name an UnsupportedActivationError "
            "shows (e.g. 'gelu', 'silu', 'sigmoid'), or a qualified name such as 'mypkg.op' for a function "
            "from outside torch."
        )
    return names


def _requires_grad(out: Any) -> bool:
    """Whether a result (a tensor, or a tuple/list of them) carries a gradient."""
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, tuple | list) and not isinstance(out, torch.Size):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in out)
    return False


def _calling_module(model: nn.Module | None) -> str:
    """`` (module 'layer1.0.act', GELU)``: the innermost module whose code made the current call, found on
    the Python stack (only when an error is raised, so the forward pays nothing), named in ``model``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            names = [n for n, m in model.named_modules() if m is owner] if model is not None else []
            if names and names[0]:
                return f" (module {names[0]!r}, {type(owner).__name__})"
            return f" (in the forward of {'the model, ' if names else ''}{type(owner).__name__})"
        frame = frame.f_back
    return ""


class _Rectifier(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU6 (``upper=6``), in place or not, with the phase's backward rule:
    ``δz = max(δa, 0) · mask`` in the guided pass, ``δz = δa · mask`` otherwise, where
    ``mask = 1[z > 0]`` (ReLU) or ``1[0 < z < 6]`` (ReLU6), read off the saved output ``a`` (``a > 0``
    iff ``z > 0``; ``0 < a < 6`` iff ``0 < z < 6``) by the native fused kernels. The output is saved
    detached: a constant, so the standard pass's recorded graph does not lead back into the forward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, upper: float | None, inplace: bool, state: _State) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        if inplace:
            out = x.clamp_(min=0.0, max=upper)
            ctx.mark_dirty(out)
        else:
            out = x.clamp(min=0.0, max=upper)
        ctx.save_for_backward(out.detach())
        ctx.state, ctx.upper = state, upper
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        phase = ctx.state.phase
        if grad is None or (phase is Phase.FREE and not ctx.state.parameter_path):
            return None, None, None, None
        (out,) = ctx.saved_tensors
        if ctx.upper is None:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        else:
            grad = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.upper)
        if phase is Phase.GUIDED:  # max(δa, 0)·mask = max(δa·mask, 0): in place on the fresh result
            grad = grad.clamp(min=0) if torch.is_grad_enabled() else grad.clamp_(min=0)
        return grad, None, None, None


class _Normalize(torch.autograd.Function):
    """Batch normalisation ``y = (x − μ) · γ / sqrt(σ² + ε) + β`` with the phase's backward rule.

    ``train=True``: ``μ, σ²`` are this batch's statistics (native kernel; running statistics updated
    when given). ``train=False``: the running statistics (eval-mode normalisation). Backward:

    * ``Phase.FREE`` (``loss.backward()``): the exact backward of what ran: for ``train=True`` through
      ``μ_B`` and ``σ²_B``, as ordinary training; skipped when the forward feeds no loss directly;
    * ``Phase.STANDARD`` / ``Phase.GUIDED`` (the input-gradient passes): ``δx = δy · γ / sqrt(σ² + ε)``,
      the statistics held constant. Written with differentiable ops, so the standard pass taken with
      ``create_graph=True`` is differentiable in ``γ`` (and, through ``δy``, in every other parameter),
      while ``μ, σ²`` stay constants: ``∇θ L_R`` is exact up to the held-constant statistics.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        train: bool,
        momentum: float,
        eps: float,
        state: _State,
        record: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        if train:
            out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
            var = None
            if record is not None:
                record.append((mean.detach(), invstd.detach()))
        else:
            assert running_mean is not None and running_var is not None
            out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
            mean, var = running_mean.clone(), running_var.clone()
            invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, var)
        ctx.state, ctx.eps, ctx.train = state, eps, train
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        none7 = (None,) * 7
        phase = ctx.state.phase
        if grad is None or (phase is Phase.FREE and not ctx.state.parameter_path):
            return (None, None, None, *none7)
        x, weight, mean, invstd, var = ctx.saved_tensors
        if phase is Phase.FREE:
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            if ctx.train:
                gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
                )
            else:
                gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    grad, x, weight, mean, var, None, None, False, ctx.eps, mask
                )
            return (gx, gw, gb, *none7)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else weight * invstd
        # in the gradient's own precision (bf16 under autocast): a float32 scale would promote the whole
        # pass to float32, and autograd would cast it back at the next node
        return (grad * scale.to(grad.dtype).view(shape), None, None, *none7)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conf: tuple[Any, ...], mask: list[bool], bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The native convolution backward ``(δx, δW, δb)`` for ``mask``, except that the input gradient of a
    strided grouped convolution in reduced precision on the CPU goes through :func:`strided_input_grad`."""
    stride, padding, dilation, groups = conf
    bias_sizes = [weight.shape[0]] if bias else None
    if mask[0] and _slow_strided_grouped(x, conf):
        gx = strided_input_grad(grad, x, weight, conf)
        if not (mask[1] or mask[2]):
            return gx, None, None
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, [False, mask[1], mask[2]]
        )
        return gx, gw, gb
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )


def _slow_strided_grouped(x: torch.Tensor, conf: tuple[Any, ...]) -> bool:
    """Where the CPU's native input gradient is a slow fallback: a strided grouped (depthwise) convolution in
    bf16/fp16 (measured, torch 2.14, Zen 5: a stride-2 depthwise 3×3 at batch 64 takes 60–100 ms, 30–200× its
    stride-1 counterpart and the float32 kernel; MobileNet-V2 has four of them)."""
    stride, _, _, groups = conf
    return groups > 1 and stride != [1, 1] and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def strided_input_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conf: tuple[Any, ...]
) -> torch.Tensor:
    """The input gradient of ``conv2d(x, W)`` with stride ``s`` through a stride-1 one: ``δx = convᵀ₁(D(δy), W)``.

    ``D(δy)`` spreads the output gradient ``[N, C_out, H_out, W_out]`` onto the stride-1 output grid
    ``H₁ = H + 2p − d(k − 1)`` (``δy`` at rows and columns ``0, s, 2s, …``, zeros elsewhere; ``⌈H₁/s⌉ = H_out``),
    so it is exact: the same products, plus zeros. Built channels-last, the layout the fast kernels take.
    Shapes: ``grad`` ``[N, C_out, H_out, W_out]``, ``x`` ``[N, C_in, H, W]``; returns ``[N, C_in, H, W]``.
    """
    stride, padding, dilation, groups = conf
    n, c, ho, wo = grad.shape
    h1 = x.shape[2] + 2 * padding[0] - dilation[0] * (weight.shape[2] - 1)
    w1 = x.shape[3] + 2 * padding[1] - dilation[1] * (weight.shape[3] - 1)
    spread = grad.new_zeros(n, h1, w1, c)
    spread[:, :: stride[0], :: stride[1], :] = grad.permute(0, 2, 3, 1)
    assert spread[:, :: stride[0], :: stride[1]].shape[1:3] == (ho, wo)
    unit = ([1, 1], padding, dilation, groups)
    gx = _conv_backward(spread.permute(0, 3, 1, 2), x, weight, unit, [True, False, False], False)[0]
    assert gx is not None  # the input gradient was asked for
    return gx


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose *standard* input-gradient pass records a cheap, exact double backward.

    Autograd's generic double backward of a convolution computes the weight term with a convolution
    over batch-and-channel-swapped tensors, which is slow on CPUs. Here the standard pass taken with
    ``create_graph=True`` returns ``δx = convᵀ(δy, W)`` through :class:`_ConvInputGrad`, whose own
    backward uses the native kernels: ``∂/∂δy = conv(·, W)`` and ``∂/∂W = weight-gradient(δy, ·)``.
    Every other pass uses the native ``convolution_backward``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conf: tuple[Any, ...],
        state: _State,
        leaf: bool,
    ) -> torch.Tensor:
        stride, padding, dilation, groups = conf
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.state, ctx.has_bias, ctx.leaf = conf, state, bias is not None, leaf
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        phase = ctx.state.phase
        none3 = (None, None, None)
        if grad is None or (phase is Phase.FREE and not ctx.state.parameter_path):
            return None, None, None, *none3
        x, weight = ctx.saved_tensors
        if phase is not Phase.FREE:  # an input-gradient pass: no parameter gradients
            if phase is Phase.STANDARD and torch.is_grad_enabled():
                return _ConvInputGrad.apply(grad, weight, x.detach(), ctx.conf), None, None, *none3
            return _conv_backward(grad, x, weight, ctx.conf, [True, False, False], False)[0], None, None, *none3
        mask = [
            ctx.needs_input_grad[0] and not ctx.leaf,
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = _conv_backward(grad, x, weight, ctx.conf, mask, ctx.has_bias)
        return gx, gw, gb, *none3


class _ConvInputGrad(torch.autograd.Function):
    """``δx = convᵀ(δy, W)`` as a differentiable function of ``(δy, W)`` (see :class:`_Conv2d`)."""

    @staticmethod
    def forward(
        ctx: Any, grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, conf: tuple[Any, ...]
    ) -> torch.Tensor:
        ctx.save_for_backward(grad, weight)
        ctx.conf = conf
        dx = _conv_backward(grad, x, weight, conf, [True, False, False], False)[0]
        assert dx is not None  # asked for by the mask
        return dx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        g_grad = g_weight = None
        if ctx.needs_input_grad[0]:
            g_grad = F.conv2d(gg, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            g_weight = _conv_backward(grad, gg, weight, ctx.conf, [False, True, False], False)[1]
        return g_grad, g_weight, None, None
