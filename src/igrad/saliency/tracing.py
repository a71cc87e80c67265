"""``torch.fx`` tools for the methods that run a model many times: cut a model at a layer, to run only
the part after it (``ablationcam``), and fold eval-mode BatchNorm into the convolutions (``scorecam``).

Why fx: Ablation-CAM needs the logits for ``B·K`` ablated copies of the target layer's output. Running
the whole model on ``B·K`` inputs with a hook that swaps the layer's output (pytorch-grad-cam's way)
computes every layer *before* the target ``B·K`` times for nothing. For a ``nn.Sequential`` one could
slice the model, but real forwards are not sequential (torchvision's ResNet calls ``torch.flatten``,
DenseNet a functional ReLU, a residual edge may bypass the layer). ``torch.fx`` records the forward
as a graph of calls, with the target layer kept as one opaque call, so the part that depends on the
layer's output (the *tail*) can be cut out exactly, functional calls included:

* ``tail(activation, *externals) -> logits`` runs the nodes that depend on the layer's output;
* *externals* are values computed before the layer but used after it (a skip connection that
  bypasses the layer, for instance); they come from a ``head`` graph run once per batch and are
  indexed per image. Most models (ResNet, VGG, DenseNet, MobileNet at their default layers) have none.

The submodules of the tail are the model's own (shared parameters, hooks fire as usual).

:func:`fold_batchnorm` returns a copy of an eval-mode model in which every ``Conv → BatchNorm`` pair
is one convolution with ``W' = W·γ/√(σ²+ε)`` and ``b' = (b − μ)·γ/√(σ²+ε) + β`` (the same function
up to float rounding; torch's own ``torch.fx.experimental.optimization.fuse``), with the copy's hooks
removed. It saves the BatchNorm pass of every forward; callers check the copy against the model's
own logits before using it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

__all__ = ["LayerTail", "TracingError", "fold_batchnorm"]


class TracingError(Exception):
    """The model cannot be traced, cut at the layer or folded (not traceable, layer used twice, ...)."""


class _LeafTracer(fx.Tracer):
    """The default tracer, with the target layer kept as a single ``call_module`` node."""

    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


class LayerTail:
    """``model`` cut at its submodule ``layer`` (dotted name) into ``head`` (only when externals are
    needed) and ``tail``. Raises :class:`TracingError` when it cannot be done."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        tracer = _LeafTracer(layer)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...) on untraceable code
            raise TracingError(
                f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc})"
            ) from exc
        nodes = list(graph.nodes)
        hits = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if len(hits) != 1:
            raise TracingError(f"layer {layer!r} is called {len(hits)} times in the traced forward (need exactly 1)")
        cut = hits[0]
        dependent: set[fx.Node] = {cut}
        for n in nodes:
            if any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        (output,) = [n for n in nodes if n.op == "output"]
        if output not in dependent:
            raise TracingError(f"the model's output does not depend on layer {layer!r}")
        externals = []
        for n in nodes:
            if n in dependent and n is not cut:
                for a in n.all_input_nodes:
                    if a not in dependent and a.op != "get_attr" and a not in externals:
                        externals.append(a)

        # tail: placeholders for the activation and the externals, then the dependent nodes in order
        tail = fx.Graph()
        env: dict[fx.Node, fx.Node] = {cut: tail.placeholder("activation")}
        for i, e in enumerate(externals):
            env[e] = tail.placeholder(f"external_{i}")
        for n in nodes:
            if n in env:
                continue
            if n in dependent or (n.op == "get_attr" and any(u in dependent for u in n.users)):
                env[n] = tail.node_copy(n, lambda a: env[a])
        tail.lint()
        self.tail = fx.GraphModule(model, tail, class_name=f"{type(model).__name__}Tail")
        self.layer = layer
        self.needs_externals = bool(externals)
        self.head: fx.GraphModule | None = None
        if externals:
            head = fx.Graph()
            henv: dict[fx.Node, fx.Node] = {}
            for n in nodes:
                if n not in dependent:
                    henv[n] = head.node_copy(n, lambda a: henv[a])
            head.output(tuple(henv[e] for e in externals))
            self.head = fx.GraphModule(model, head, class_name=f"{type(model).__name__}Head")
            self.head.graph.eliminate_dead_code()
            self.head.recompile()

    def externals(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The values computed before the layer and used after it, for input ``x``; each must be a
        tensor with ``x``'s batch size (so it can be indexed per image)."""
        if self.head is None:
            return []
        values = list(self.head(x))
        for v in values:
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != x.shape[0]:
                raise TracingError(f"a value that bypasses layer {self.layer!r} is not a per-image tensor")
        return values


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` (eval mode) with each ``Conv``/``Linear`` followed by its ``BatchNorm``
    folded into one layer, and no hooks. Raises :class:`TracingError` when the model cannot be copied or
    traced, or is in training mode (its BatchNorm then uses batch statistics: nothing to fold)."""
    if any(m.training for m in model.modules()):
        raise TracingError(f"{type(model).__name__} is in training mode; BatchNorm is folded only in eval mode")
    try:
        folded = fuse(model, inplace=False)
    except Exception as exc:  # deepcopy or fx tracing can fail in many ways on arbitrary models
        raise TracingError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc})"
        ) from exc
    for m in folded.modules():  # the deep copy carries the model's hooks (ours included): drop them
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
    assert isinstance(folded, fx.GraphModule)  # what fuse returns (typed as nn.Module)
    return folded
