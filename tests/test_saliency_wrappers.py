"""Wrapped models (DataParallel, a single-process DistributedDataParallel, torch.compile, SWA's
AveragedModel): every saliency method sees through the wrapper. References: pytorch-grad-cam on the bare
model at ``layer4`` (tolerance 1e-5 as in test_saliency_parity.py); for the methods it does not have, the
bare model's maps (identical arithmetic: equality)."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

import igrad
from igrad.models import unwrap_model, wrapper_prefix
from igrad.saliency import METHODS, create_method, resolve_layer

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

ATOL = 1e-5
THEIRS = {
    "gradcam": ("GradCAM", {}),
    "gradcam++": ("GradCAMPlusPlus", {"eps": 1e-6}),
    "xgradcam": ("XGradCAM", {}),
    "layercam": ("LayerCAM", {}),
    "scorecam": ("ScoreCAM", {"mask_align_corners": True}),
    "ablationcam": ("AblationCAM", {}),
}
OPTIONS = {"smoothgrad": {"n_samples": 2}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return igrad.create_model("cifar_resnet18", num_classes=10, width=0.125).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


T = torch.tensor([3, 8])


@pytest.fixture(scope="module")
def reference(model, x):
    """Each method's maps on the bare model: pytorch-grad-cam where it has the method, else ours."""
    out = {}
    for name in METHODS:
        if name in THEIRS:
            cls = getattr(pgc, THEIRS[name][0])
            with contextlib.redirect_stderr(io.StringIO()), cls(model, [model.layer4]) as cam:
                out[name] = torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in T]))
        else:
            with create_method(name, model, **OPTIONS.get(name, {})) as m:
                out[name] = m(x, T)
    return out


@contextlib.contextmanager
def _single_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


WRAPPERS = {
    "dataparallel": (lambda m: nn.DataParallel(m), "module."),
    "ddp": (lambda m: nn.parallel.DistributedDataParallel(m), "module."),
    "compiled": (lambda m: torch.compile(m, backend="eager"), "_orig_mod."),
    "compiled-dataparallel": (lambda m: torch.compile(nn.DataParallel(m), backend="eager"), "_orig_mod.module."),
    "averaged": (lambda m: AveragedModel(m), "module."),
}


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_every_method_sees_through_the_wrapper(model, x, reference, kind):
    wrap, prefix = WRAPPERS[kind]
    with _single_process_group() if kind == "ddp" else contextlib.nullcontext():
        wrapped = wrap(model)
        inner = unwrap_model(wrapped)  # AveragedModel holds a copy
        assert (inner is model or kind == "averaged") and wrapper_prefix(wrapped) == prefix
        assert igrad.default_target_layer(wrapped) == prefix + "layer4"
        for layer in (None, "layer4", prefix + "layer4", inner.layer4):
            assert resolve_layer(wrapped, layer) == (inner.layer4, "layer4")
        for name, expected in reference.items():
            options = {**THEIRS.get(name, (None, {}))[1], **OPTIONS.get(name, {})}
            with create_method(name, wrapped, **options) as m:
                maps = m(x, T)
                if name == "ablationcam":
                    assert m.traced_tail() is not None  # the fx tail traced the network inside, no fallback
            tol = ATOL if name in THEIRS else 0.0
            assert (maps - expected).abs().max() <= tol, name


@pytest.mark.filterwarnings("error")
def test_scorecam_folds_the_network_inside(model, x, reference):
    """BatchNorm folding traces the inner network (a wrapper would not fold or would not trace)."""
    for wrapped in (nn.DataParallel(model), torch.compile(model, backend="eager")):
        with create_method("scorecam", wrapped, fold_batchnorm=True, mask_align_corners=True) as m:
            maps = m(x, T)
            assert m._folded is not None
        assert (maps - reference["scorecam"]).abs().max() < ATOL


def test_wrapped_name_errors_and_inner_names(model):
    dp = nn.DataParallel(model)
    with pytest.raises(igrad.IgradError, match="no target layer 'layer9'.*Closest: 'layer4'"):
        resolve_layer(dp, "module.layer9")
    with pytest.raises(igrad.IgradError, match="not a module of"):
        resolve_layer(dp, dp)  # the wrapper itself is not a layer of the network


class _HasModuleChild(nn.Module):
    """A network with its own child called ``module`` (not a wrapper)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.module = net

    def forward(self, x):
        return self.module(x)


def test_inner_spelling_wins_only_when_the_wrapper_spelling_is_absent(model):
    inner = _HasModuleChild(model)
    dp = nn.DataParallel(inner)
    assert resolve_layer(dp, "module.module.layer4")[1] == "module.layer4"  # the wrapper's spelling
    assert resolve_layer(dp, "module.layer4")[1] == "module.layer4"  # the inner network's own name


@pytest.mark.parametrize("stats", ["running", "batch-frozen", "coupled"])
def test_gradient_alignment_loss_sees_through_wrappers(model, x, stats):
    """The loss runs the network inside a compiled module eagerly (the rules' TorchFunctionMode needs it),
    and the extra eval-statistics forward runs the network inside any wrapper (one home: unwrap_model)."""
    crit = igrad.GradientAlignmentLoss(stats=stats)

    def fresh():  # the training-mode forward updates the running statistics: each call gets a fresh copy
        return copy.deepcopy(model).train()

    bare, _ = crit(fresh(), x, T)
    wrapped, _ = crit(nn.DataParallel(fresh()), x, T)
    compiled, _ = crit(torch.compile(fresh(), backend="eager"), x, T)
    assert torch.equal(bare, wrapped) and torch.equal(bare, compiled)


def test_gradient_functions_on_compiled_and_wrapped_models(model, x):
    """igrad.gradient (plain and guided) and gradient_cosine on torch.compile'd / DataParallel models equal
    the bare model's (a compiled module used to fail inside dynamo with the rules' TorchFunctionMode)."""
    for wrapped in (torch.compile(model, backend="eager"), nn.DataParallel(model)):
        for guided in (False, True):
            torch.testing.assert_close(
                igrad.gradient(wrapped, x, T, guided=guided), igrad.gradient(model, x, T, guided=guided), rtol=0, atol=0
            )
        torch.testing.assert_close(
            igrad.gradient_cosine(wrapped, x, T), igrad.gradient_cosine(model, x, T), rtol=0, atol=0
        )
