"""What the backward rules know about each torch function (docs/method.md §The loss: every call on the gradient path is
known).

The engine (:class:`igrad.rules.BackwardRules`) sees every torch call of a forward pass and sorts it:

* :data:`PASS`, an **allow-list** of functions that keep their ordinary backward in every pass:
  linear and affine maps, products, pooling, shape and indexing operations, type conversions, dropout,
  per-sample normalisations, and calls whose result is never differentiable (shape queries). For
  linear maps and piecewise selections the guided-backprop rule *is* the ordinary backward
  (Springenberg et al. change only the rectifiers; max-pooling keeps its switches).
* :data:`RECTIFIER_FORMS`, the calls that can be written rectifiers (``F.relu``, ``F.hardtanh``,
  ``torch.clamp``, ``F.threshold``, ...); :func:`rectifier_upper` decides from their arguments whether a call
  is ReLU, ReLU6 or neither.
* everything else, refused by the engine when its result lies on the gradient path, unless allowed by the
  name :func:`allow_name` gives it (the name its error message shows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PASS", "RECTIFIER_FORMS", "INPLACE", "DIVISIONS", "rectifier_upper", "allow_name", "qualified_name"]

_NAMESPACES = (F, torch, torch.Tensor)


def _collect(names: str, namespaces: Iterable[Any] = _NAMESPACES) -> set[Callable[..., Any]]:
    """The functions called ``names`` (whitespace-separated) in each namespace that has them."""
    return {getattr(ns, n) for n in names.split() for ns in namespaces if hasattr(ns, n)}


def _getters(names: str) -> set[Callable[..., Any]]:
    """The ``__get__`` of ``torch.Tensor`` attributes (``x.T``, ``x.shape``): what a mode sees for them."""
    return {getattr(torch.Tensor, n).__get__ for n in names.split()}


#: Addition, subtraction, scaling, sums: linear or affine. ``x * y`` of two tensors on the path is bilinear
#: (attention, gating) and keeps its ordinary backward; a gate's own non-linearity (sigmoid, ...) is refused.
_ARITHMETIC = _collect(
    "add add_ sub sub_ subtract subtract_ rsub mul mul_ multiply multiply_ neg neg_ negative negative_ positive "
    "sum mean cumsum __add__ __radd__ __iadd__ __sub__ __isub__ __rsub__ __mul__ __rmul__ __imul__ __neg__ __pos__"
)
#: Matrix products, linear layers and convolutions: linear in each argument.
_PRODUCTS = _collect(
    "linear bilinear matmul __matmul__ __rmatmul__ mm bmm addmm addmm_ addbmm addbmm_ baddbmm baddbmm_ addmv addmv_ "
    "mv dot vdot inner outer ger kron einsum tensordot conv1d conv2d conv3d conv_transpose1d conv_transpose2d "
    "conv_transpose3d convolution"
)
#: Reshaping, indexing, concatenation, padding, resampling, copies and type conversions: selections and
#: linear maps of the values.
_SHAPE = _collect(
    "reshape reshape_as view view_as flatten unflatten ravel permute transpose transpose_ swapaxes swapdims t t_ "
    "movedim moveaxis contiguous squeeze squeeze_ unsqueeze unsqueeze_ expand expand_as broadcast_to "
    "broadcast_tensors repeat tile repeat_interleave flip fliplr flipud roll rot90 narrow select index_select gather "
    "take_along_dim diagonal __getitem__ __setitem__ split split_with_sizes tensor_split chunk unbind cat concat "
    "concatenate stack hstack vstack dstack clone copy_ pad constant_pad_nd unfold fold interpolate upsample "
    "upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle "
    "to type type_as float double half bfloat16 cpu cuda requires_grad_"
) | _getters("T mT H mH")
#: Pooling: averages are linear; max-pooling and global max (``amax``) are piecewise selections whose
#: guided rule is the ordinary backward (the "switches" of Springenberg et al.; captum does the same).
_POOLING = _collect(
    " ".join(
        f"avg_pool{d}d adaptive_avg_pool{d}d max_pool{d}d max_pool{d}d_with_indices adaptive_max_pool{d}d "
        f"adaptive_max_pool{d}d_with_indices max_unpool{d}d"
        for d in (1, 2, 3)
    )
    + " amax amin"
)
#: Dropout multiplies by a random mask (alpha-dropout: an affine map): linear.
_DROPOUT = _collect(
    "dropout dropout_ dropout1d dropout2d dropout3d feature_dropout feature_dropout_ alpha_dropout alpha_dropout_ "
    "feature_alpha_dropout feature_alpha_dropout_"
)
#: Per-sample normalisations: their statistics are taken over one sample's own values, so they couple no
#: samples, and they keep their exact backward (statistics not held constant, unlike BatchNorm: δx is the true
#: gradient of the model as used). Guided backpropagation defines no other rule for them.
_NORMALISATION = _collect("layer_norm group_norm instance_norm rms_norm")
#: Calls whose result is never differentiable (shape and property queries): listed only to skip the check.
_QUERIES = _collect("dim size numel stride __len__ is_floating_point is_contiguous detach _assert") | _getters(
    "shape dtype device ndim requires_grad is_cuda grad_fn layout"
)

#: Functions that keep their ordinary backward in every pass (see the module docstring).
PASS: frozenset[Callable[..., Any]] = frozenset(
    _ARITHMETIC | _PRODUCTS | _SHAPE | _POOLING | _DROPOUT | _NORMALISATION | _QUERIES
)

#: Division: linear when the divisor is constant, a reciprocal (a non-linearity) when it is on the path.
DIVISIONS: frozenset[Callable[..., Any]] = frozenset(
    _collect("div div_ divide divide_ true_divide true_divide_ __truediv__ __itruediv__ __div__ __idiv__")
)

Parsed = tuple[Any, Any, Any, bool]  # (input, lower bound, upper bound, in place)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("input", kwargs.get("self"))


def _relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    return _input(args, kwargs), 0, None, bool(_arg(args, kwargs, 1, "inplace", False))


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    return _input(args, kwargs), 0, 6, bool(_arg(args, kwargs, 1, "inplace", False))


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    return _input(args, kwargs), lo, hi, bool(_arg(args, kwargs, 3, "inplace", False))


def _clamp(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    return _input(args, kwargs), _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max"), False


def _clamp_min(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    return _input(args, kwargs), _arg(args, kwargs, 1, "min"), None, False


def _threshold(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Parsed:
    """``y = x if x > threshold else value``: ReLU when both are 0, else no rectifier (bounds ``None``)."""
    th, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
    relu = _is_number(th) and _is_number(value) and th == 0 and value == 0
    return _input(args, kwargs), 0 if relu else None, None, bool(_arg(args, kwargs, 3, "inplace", False))


#: Calls that may be rectifiers, each with the parser of its arguments.
RECTIFIER_FORMS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], Parsed]] = {
    **dict.fromkeys(_collect("relu relu_"), _relu),
    F.relu6: _relu6,
    **dict.fromkeys(_collect("hardtanh hardtanh_"), _hardtanh),
    **dict.fromkeys(_collect("clamp clamp_ clip clip_"), _clamp),
    **dict.fromkeys(_collect("clamp_min clamp_min_"), _clamp_min),
    **dict.fromkeys(_collect("threshold threshold_"), _threshold),
}
#: The rectifier calls that always work in place.
INPLACE: frozenset[Callable[..., Any]] = frozenset(
    _collect("relu_ hardtanh_ clamp_ clip_ clamp_min_ threshold_", (F, torch, torch.Tensor))
)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


#: Returned by :func:`rectifier_upper` for bounds that make no rectifier.
NOT_A_RECTIFIER = object()


def rectifier_upper(lo: Any, hi: Any) -> float | None | object:
    """``None`` for ReLU (``lo = 0``, no upper bound), ``6.0`` for ReLU6 (``[0, 6]``), else
    :data:`NOT_A_RECTIFIER` (other bounds, tensor bounds: non-linearities without a guided rule)."""
    if not (_is_number(lo) and lo == 0):
        return NOT_A_RECTIFIER
    if hi is None:
        return None
    return 6.0 if _is_number(hi) and hi == 6 else NOT_A_RECTIFIER


def _normalise(name: str) -> str:
    return name.strip("_").lower()


@functools.cache
def _public_names() -> dict[Callable[..., Any], str]:
    """Every public function of ``torch.nn.functional``, ``torch``, ``torch.special``, ``torch.linalg``,
    ``torch.fft`` and ``torch.Tensor`` (methods, dunders, attribute getters) by its normalised name
    (in-place variants and dunders lose their underscores: ``exp_`` is ``exp``, ``__rdiv__`` ``rdiv``)."""
    names: dict[Callable[..., Any], str] = {}
    for ns in (F, torch, torch.special, torch.linalg, torch.fft, torch.Tensor):
        for attr in dir(ns):
            if attr.startswith("_") and not attr.endswith("__"):
                continue
            obj = getattr(ns, attr, None)
            if obj is not None and type(obj).__name__ == "getset_descriptor":
                obj = obj.__get__
            if callable(obj) and not isinstance(obj, type):
                try:
                    names.setdefault(obj, _normalise(attr))
                except TypeError:  # unhashable
                    pass
    return names


def allow_name(func: Callable[..., Any]) -> str:
    """The name by which ``allow=[...]`` lets ``func`` through and errors name it: the public name for
    torch's own functions (``gelu``, ``sigmoid`` for every form of it, ``pow`` for ``x ** 2``), else the
    function's qualified name (:func:`qualified_name`)."""
    name = _public_names().get(func)
    return name if name is not None else qualified_name(func)


@functools.cache
def known_short_names() -> frozenset[str]:
    """Every name :func:`allow_name` can give a torch function (to catch typos in ``allow``)."""
    return frozenset(_public_names().values())


def qualified_name(func: Callable[..., Any]) -> str:
    """``torch.Tensor.add``, ``torch.exp``, ``torch.nn.functional.gelu``, ``torch.Tensor.real`` (attribute),
    or ``module.name`` for functions from elsewhere."""
    owner = getattr(func, "__self__", None)
    if owner is not None and type(owner).__name__ == "getset_descriptor":
        return f"torch.Tensor.{owner.__name__}"
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", name)
    module = getattr(func, "__module__", None)
    if isinstance(func, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
        return f"torch.ops.{func}"
    if getattr(func, "__objclass__", None) is torch._C.TensorBase or qual.split(".")[0] in ("Tensor", "TensorBase"):
        return f"torch.Tensor.{name}"
    if module in (None, "torch") or qual.startswith("_VariableFunctionsClass"):
        return f"torch.{name}"
    if module in ("torch._C._nn", "torch.nn.functional"):
        public = _public_names().get(func)
        return f"torch.nn.functional.{public or name}"
    return f"{module}.{qual}" if "<locals>" not in qual else f"{module}.{name}"
