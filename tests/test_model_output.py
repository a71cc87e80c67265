"""The model-output contract at every entry point (docs/method.md §Metrics), the inference-mode gradient functions, and
models whose first registered convolution is not what receives the image.

* Outputs of another form than logits ``[B, K]`` (a tuple, a dict, probabilities, log-probabilities) are
  refused with an IgradError naming what came back, at every entry point: the gradient functions, the
  loss, every registered saliency method, the metrics, accuracy, evaluation and ``explain``.
* ``igrad.LogitsOutput`` adapts a tuple/dict model: every entry point then gives what it gives on the bare
  logits model (the reference: the same computation on that model).
* ``gradient``/``gradient_cosine``/``input_gradients`` explain the model as used at inference (eval mode,
  modes and buffers restored): references are plain autograd and hook-based guided backprop on an
  eval-mode deep copy. The loss keeps the model's own (training) modes: reference, a plain train-mode
  forward with the same dropout seed.
* A model with a decoy 16-channel convolution registered before its 3-channel stem runs everywhere
  (references: plain autograd, pytorch-grad-cam, the same weights registered in the natural order); a
  wrong channel count gives the model's own error with a note naming the model and the input shape.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igrad
from igrad import IgradError, LogitsOutput
from igrad.data import Split
from igrad.evaluate import evaluate_model
from igrad.measure import evaluate_accuracy
from igrad.metrics import causal_curves, compute_metrics, confidence_metrics, deletion, insertion
from igrad.normalization import Normalization
from igrad.saliency import METHODS, create_method
from igrad.visualize import explain
from references import plain_input_gradient

K = 5
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CHEAP = {"smoothgrad": {"n_samples": 2}, "scorecam": {"batch_size": 16}}


class Net(nn.Module):
    """conv-BN-ReLU, conv-ReLU (the target layer), global average pooling, dropout, linear head."""

    igrad_target_layer = "block"

    def __init__(self, in_ch: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        return self.fc(self.drop(self.block(self.stem(x)).mean((2, 3))))


def make_net(seed: int = 0, dropout: float = 0.0) -> Net:
    torch.manual_seed(seed)
    net = Net(dropout=dropout)
    with torch.no_grad():  # running statistics unlike any batch's, so that train and eval mode differ
        net.stem[1].running_mean.uniform_(-0.5, 0.5)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


class TupleOut(nn.Module):
    """Returns ``(logits, features)``."""

    igrad_target_layer = "net.block"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), self.net.stem[0](x)


class DictOut(TupleOut):
    def forward(self, x):
        return {"features": self.net.stem[0](x), "logits": self.net(x)}


class SoftmaxOut(TupleOut):
    def forward(self, x):
        return self.net(x).softmax(1)


class LogSoftmaxOut(TupleOut):
    def forward(self, x):
        return F.log_softmax(self.net(x), dim=1)


class ProbsAndFeatures(TupleOut):
    def forward(self, x):
        return self.net(x).softmax(1), self.net.stem[0](x)


BAD = {
    "tuple": (TupleOut, [r"TupleOut returned a tuple of 2 elements \(a tensor of shape \(\d+, 5\)", r"select=0\)"]),
    "dict": (DictOut, [r"DictOut returned a dict with keys \['features', 'logits'\]", r"select='logits'\)"]),
    # the gradient entry points meet the soft-max inside the forward (the engine refuses it, naming the model
    # and the fix); the others see the probabilities come out (the output contract): both say the same
    "softmax": (SoftmaxOut, ["SoftmaxOut", "returns probabilities", "ends in softmax", "(?i)remove the final softmax"]),
    "log_softmax": (LogSoftmaxOut, ["LogSoftmaxOut", "returns log-probabilities", "ends in log_softmax"]),
}


def _images(n: int = 3, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _maps(n: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(7))


def _split(n: int = 6, size: int = 8) -> Split:
    g = torch.Generator().manual_seed(3)
    return Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % K, [])


Y = torch.tensor([0, 3, 4])

# every entry point that runs a model on images: fn(model, x, y) -> something comparable
ENTRY = {
    "gradient": lambda m, x, y: igrad.gradient(m, x, y),
    "gradient-guided": lambda m, x, y: igrad.gradient(m, x, y, guided=True),
    "gradient_cosine": lambda m, x, y: igrad.gradient_cosine(m, x, y),
    "input_gradients": lambda m, x, y: tuple(igrad.input_gradients(m, x, y)),
    "confidence_metrics": lambda m, x, y: confidence_metrics(m, x, _maps(), y, mean=MEAN, std=STD, batch_size=4),
    "insertion": lambda m, x, y: tuple(insertion(m, x, _maps(), y, step=16, batch_size=4)),
    "deletion": lambda m, x, y: tuple(deletion(m, x, _maps(), None, step=16, batch_size=4)),
    "compute_metrics": lambda m, x, y: compute_metrics(m, x, _maps(), y, mean=MEAN, std=STD, step=32).values,
    "causal_curves": lambda m, x, y: causal_curves(m, x, torch.zeros_like(x), _maps(), y, step=16, batch_size=4),
    "evaluate_accuracy": lambda m, x, y: evaluate_accuracy(m, _split(), Normalization(MEAN, STD), batch_size=4),
    "evaluate_model": lambda m, x, y: evaluate_model(
        m, _split(), mean=MEAN, std=STD, methods="gradient", metrics="ad", accuracy=False, progress=False
    )["per_sample"],
    "explain": lambda m, x, y: {k: v.maps for k, v in explain(m, x, y, ["gradcam", "gradient"]).items()},
}


def _method_entry(name: str):
    return lambda m, x, y: create_method(name, m, **CHEAP.get(name, {}))(x, y)


def _loss_entry(stats: str):
    return lambda m, x, y: igrad.GradientAlignmentLoss(stats=stats)(m.train(), x, y)


ENTRY.update({f"saliency:{name}": _method_entry(name) for name in METHODS})
TRAINING = {  # the training loss (each statistics mode) and input_gradients as the loss calls it
    **{f"loss:{stats}": _loss_entry(stats) for stats in igrad.STATS_MODES},
    "input_gradients(train=True)": lambda m, x, y: tuple(igrad.input_gradients(m.train(), x, y, train=True)),
}


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


# --- item 3: outputs that are not logits --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("entry", list(ENTRY) + list(TRAINING))
def test_every_entry_point_refuses_outputs_that_are_not_logits(entry, kind):
    if entry == "input_gradients(train=True)" and kind in ("softmax", "log_softmax"):
        pytest.skip("train=True does not inspect the logits' values (no device sync per training step)")
    wrapper, patterns = BAD[kind]
    model = wrapper(make_net())
    model.net.block.train()  # a mixed mode, to be restored exactly (also after the error)
    flags = _flags(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = ENTRY.get(entry) or TRAINING[entry]
    with pytest.raises(IgradError) as info:
        fn(model, _images(), Y)
    for p in patterns:
        assert re.search(p, str(info.value)), (p, str(info.value))
    if entry in ENTRY:  # the training loss may update BatchNorm statistics, as any training forward does
        assert _flags(model) == flags
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, tuple | list):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    elif isinstance(a, torch.Tensor):
        # the same float32 operations on the same values: equal up to a few rounding steps of their magnitude
        scale = float(b.detach().abs().max()) if b.numel() and b.is_floating_point() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(scale, 1e-30))
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    else:
        assert a == b


@pytest.mark.parametrize("select", [0, "logits", "callable"])
@pytest.mark.parametrize("entry", list(ENTRY) + list(TRAINING))
def test_logits_output_gives_the_bare_models_results(entry, select):
    net = make_net()
    inner = TupleOut(copy.deepcopy(net)) if select in (0, "callable") else DictOut(copy.deepcopy(net))
    wrapped = LogitsOutput(inner, (lambda out: out[0]) if select == "callable" else select)
    fn = ENTRY.get(entry) or TRAINING[entry]
    x = _images()
    torch.manual_seed(5)
    ours = fn(wrapped, x, Y)
    torch.manual_seed(5)
    reference = fn(net, x, Y)  # the same computation on the bare logits model
    _assert_same(ours, reference)


def test_logits_output_default_target_layer_and_names():
    model = igrad.create_model("cifar_resnet18", num_classes=3, width=0.125)
    assert LogitsOutput(model, lambda out: out).igrad_target_layer == "model.layer4"
    assert igrad.default_target_layer(LogitsOutput(TupleOut(make_net()))) == "model.net.block"
    with pytest.raises(IgradError, match=r"select=.*not a key of a dict with keys \['features', 'logits'\]"):
        LogitsOutput(DictOut(make_net()), "scores")(_images())
    with pytest.raises(IgradError, match="select=2 does not index a tuple of 2 elements"):
        LogitsOutput(TupleOut(make_net()), 2)(_images())
    with pytest.raises(IgradError, match=r"Net already returns a tensor \(3, 5\).*use the model directly"):
        LogitsOutput(make_net(), 0)(_images())  # would silently pick the first row
    with pytest.raises(IgradError, match="select must be an index, a key or a callable"):
        LogitsOutput(make_net(), 1.5)


@pytest.mark.parametrize(
    "entry", ["gradient", "gradient_cosine", "confidence_metrics", "insertion", "saliency:gradcam", "saliency:scorecam"]
)
def test_probabilities_picked_out_by_the_wrapper_are_still_refused(entry):
    # LogitsOutput selects; it cannot turn probabilities back into logits: the metrics would soft-max twice
    model = LogitsOutput(ProbsAndFeatures(make_net()), 0)
    with pytest.raises(IgradError) as info:
        ENTRY[entry](model, _images(), Y)
    for pattern in ("ProbsAndFeatures", "returns probabilities", "ends in softmax"):
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_softmax_model_would_have_given_a_wrong_average_drop():
    # why the refusal matters: soft-maxing probabilities again squashes p towards 1/K
    net = make_net()
    with torch.no_grad():
        net.fc.weight.mul_(40)  # confident predictions
    x = _images()
    p = net(x).softmax(1).gather(1, Y[:, None])[:, 0]
    twice = net(x).softmax(1).softmax(1).gather(1, Y[:, None])[:, 0]
    assert (p - twice).abs().max() > 0.05  # the silently wrong values the refusal prevents
    res = confidence_metrics(net, x, _maps(), Y, mean=MEAN, std=STD)
    torch.testing.assert_close(res["p"], p.float(), rtol=1e-6, atol=1e-7)  # hand-computed softmax of the logits
    with pytest.raises(IgradError, match="ends in softmax"):
        confidence_metrics(SoftmaxOut(net), x, _maps(), Y, mean=MEAN, std=STD)


@pytest.mark.parametrize(
    "output,pattern",
    [
        (lambda lg: lg[:, :, None, None], r"shape \((\d+), 5, 1, 1\).*\[\1, K\] \(flatten it: out.flatten\(1\)\)"),
        (lambda lg: lg[:2], r"a tensor of shape \(2, 5\) for a batch of [34] images"),
        (lambda lg: lg.argmax(1, keepdim=True).expand(-1, 2), "logits of dtype torch.int64"),
        (lambda lg: [lg, lg, lg, lg, lg], r"a list of 5 elements \(.*, \.\.\.\)"),
        (lambda lg: None, "returned a NoneType"),
    ],
)  # fmt: skip
def test_other_shapes_and_types_are_named(output, pattern):
    class Odd(TupleOut):
        def forward(self, x):
            return output(self.net(x))

    for entry in ("gradient", "saliency:gradcam", "confidence_metrics", "evaluate_accuracy"):
        with pytest.raises(IgradError, match=pattern):
            ENTRY[entry](Odd(make_net()), _images(), Y)


def test_logit_rows_that_are_not_probability_vectors_pass():
    # non-negative logits that do not sum to 1, and rows summing to 1 with a negative entry, are logits
    x = _images()
    for transform in (lambda lg: lg + 10.0, lambda lg: lg - lg.mean(1, keepdim=True) + 1 / K):

        class Shifted(TupleOut):
            def forward(self, x, transform=transform):
                return transform(self.net(x))

        model = Shifted(make_net())
        with torch.no_grad():
            logits = model(x)
        # the case is as intended: non-negative rows far from summing to 1, or rows summing to 1 with a negative
        assert bool((logits >= 0).all()) != bool(((logits.sum(1) - 1).abs() < 1e-5).all() and (logits < 0).any())
        ref = plain_input_gradient(model, x, Y)
        torch.testing.assert_close(igrad.gradient(model, x, Y), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_loss_refuses_a_softmax_model_with_each_new_model():
    crit = igrad.GradientAlignmentLoss()
    x = _images()
    crit(make_net().train(), x, Y)  # a logits model passes
    with pytest.raises(IgradError, match="ends in softmax"):
        crit(SoftmaxOut(make_net()).train(), x, Y)  # the same criterion, another model: checked again


# --- item 8: the gradient functions explain the model as used at inference -------------------------------------------


def _guided_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Guided backprop by module hooks (the classic implementation): every nn.ReLU passes back only positive
    gradients, on an eval-mode deep copy."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.register_full_backward_hook(lambda mod, gin, gout: (gin[0].clamp(min=0),))
    return plain_input_gradient(ref, x, y)


def _drop_net() -> Net:
    net = make_net(seed=4, dropout=0.5).train()
    net.block.eval()  # mixed modes, restored exactly
    return net


def test_gradient_functions_on_a_training_mode_model_explain_its_eval_mode():
    model = _drop_net()
    x, y = _images(seed=9), Y
    flags = _flags(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eval_copy = copy.deepcopy(model).eval()
    ref = plain_input_gradient(eval_copy, x, y)
    ref_guided = _guided_reference(model, x, y)
    assert ref_guided.abs().max() > 0 and not torch.allclose(ref, ref_guided)
    tol = {"rtol": 1e-5, "atol": 1e-6 * float(ref.abs().max())}
    for _ in range(2):  # Dropout off: two identical calls give the same result
        torch.testing.assert_close(igrad.gradient(model, x, y), ref, **tol)
        torch.testing.assert_close(igrad.gradient(model, x, y, guided=True), ref_guided, **tol)
        res = igrad.input_gradients(model, x, y)
        torch.testing.assert_close(res.standard, ref, **tol)
        torch.testing.assert_close(res.guided, ref_guided, **tol)
        torch.testing.assert_close(res.logits, eval_copy(x), rtol=1e-5, atol=1e-6)
    cos_ref = F.cosine_similarity(ref.flatten(1), ref_guided.flatten(1), dim=1)
    torch.testing.assert_close(igrad.gradient_cosine(model, x, y), cos_ref, rtol=1e-5, atol=1e-6)
    assert _flags(model) == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm buffers unchanged


def test_torchvision_mobilenet_v2_in_training_mode():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=K).train()  # Dropout(0.2) before the classifier
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _images(2, size=32, seed=2), Y[:2]
    ref = plain_input_gradient(copy.deepcopy(model).eval(), x, y)
    first, second = igrad.gradient(model, x, y), igrad.gradient(model, x, y)
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(first, second)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_train_true_keeps_the_models_own_modes():
    # stats="coupled" with train=True is plain train-mode autograd: the reference is exactly that, same seed
    model = _drop_net()
    x, y = _images(seed=9), Y
    torch.manual_seed(11)
    ours = igrad.input_gradients(model, x, y, guided=False, stats="coupled", train=True)
    torch.manual_seed(11)
    ref = plain_input_gradient(copy.deepcopy(model), x, y)  # a copy: its forward updates BatchNorm buffers
    torch.testing.assert_close(ours.standard, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert not torch.allclose(ours.standard, igrad.gradient(model, x, y), atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("stats", igrad.STATS_MODES)
def test_loss_still_runs_the_model_in_training_mode(stats):
    model = _drop_net()
    x, y = _images(seed=9), Y
    flags = _flags(model)
    torch.manual_seed(12)
    _, logits = igrad.GradientAlignmentLoss(stats=stats)(model, x, y)
    torch.manual_seed(12)
    ref = copy.deepcopy(model)(x)  # the plain training forward: dropout active, batch statistics
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits, copy.deepcopy(model).eval()(x), atol=1e-3)
    assert _flags(model) == flags


def test_modes_restored_when_the_forward_raises():
    model = _drop_net()
    flags = _flags(model)

    def bomb(module, inputs):
        raise RuntimeError("inside the model")

    handle = model.fc.register_forward_pre_hook(bomb)
    try:
        for fn in (igrad.gradient, igrad.gradient_cosine, igrad.input_gradients):
            with pytest.raises(RuntimeError, match="inside the model") as info:
                fn(model, _images(), Y)
            assert _flags(model) == flags
            assert any("igrad: raised by Net on input of shape (3, 3, 8, 8)" in n for n in info.value.__notes__)
    finally:
        handle.remove()


def test_a_forward_on_channels_last_images_hints_at_the_layout():
    # the model's own error is kept; the note adds the likely cause where the images look like [B, H, W, C]
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125)
    x = torch.rand(2, 32, 32, 3)
    for fn in (igrad.gradient, lambda m, x, y: igrad.saliency.create_method("gradcam", m)(x, y)):
        with pytest.raises(RuntimeError, match="expected input") as info:
            fn(model, x, 0)
        (note,) = [n for n in info.value.__notes__ if n.startswith("igrad: raised by")]
        assert note.endswith("it looks like [B, H, W, C] images: the models take [B, C, H, W], x.permute(0, 3, 1, 2)")
    with pytest.raises(RuntimeError) as info:  # a wrong channel count in [B, C, H, W] order: no such hint
        igrad.gradient(model, torch.rand(2, 5, 32, 32), 0)
    assert not any("looks like" in n for n in info.value.__notes__)


# --- item 9: the image goes where the model sends it ------------------------------------------------------------------


class Decoy(nn.Module):
    """A 16-channel 1×1 convolution registered before the 3-channel stem that receives the image."""

    igrad_target_layer = "proj"

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        return self.fc(self.proj(self.stem(x)).mean((2, 3)))


class Ordered(Decoy):
    """The same modules and names, the stem registered first."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.proj = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.fc = nn.Linear(8, K)


def _decoy() -> tuple[Decoy, Ordered]:
    torch.manual_seed(3)
    decoy = Decoy().eval()
    ordered = Ordered().eval()
    ordered.load_state_dict(decoy.state_dict())
    assert next(m for m in decoy.modules() if isinstance(m, nn.Conv2d)).in_channels == 16
    return decoy, ordered


@pytest.mark.parametrize("name", list(METHODS))
def test_decoy_convolution_registered_first_every_method_runs(name):
    decoy, ordered = _decoy()
    x = _images(2, size=12, seed=4)
    maps = create_method(name, decoy, **CHEAP.get(name, {}))(x, Y[:2])
    assert maps.shape == (2, 12, 12)
    # the registration order is the only difference: the same maps as on the naturally ordered model
    torch.testing.assert_close(maps, create_method(name, ordered, **CHEAP.get(name, {}))(x, Y[:2]))


def test_decoy_convolution_against_independent_references():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    decoy, _ = _decoy()
    x, y = _images(2, size=12, seed=4), Y[:2]
    ref = plain_input_gradient(decoy, x, y)
    torch.testing.assert_close(
        create_method("gradient", decoy).attribute(x, y), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())
    )
    with contextlib.redirect_stderr(io.StringIO()), GradCAM(decoy, [decoy.proj]) as cam:
        theirs = torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in y]))
    ours = create_method("gradcam", decoy)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # tolerance: tests/test_saliency_parity.py


def test_model_that_expands_grayscale_is_not_refused():
    class Gray(nn.Module):
        igrad_target_layer = "net.block"

        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x):
            return self.net(x.expand(-1, 3, -1, -1))

    model = Gray().eval()
    x, y = _images(2, c=1, seed=6), Y[:2]
    ref = plain_input_gradient(model, x, y)
    torch.testing.assert_close(igrad.gradient(model, x, y), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    for name in METHODS:
        if name != "cam":  # cam needs the logits linear in the pooled layer: they are
            assert create_method(name, model, **CHEAP.get(name, {}))(x, y).shape == (2, 8, 8)


@pytest.mark.parametrize(
    "entry", ["gradient", "confidence_metrics", "evaluate_model"] + [f"saliency:{n}" for n in METHODS]
)
def test_wrong_channel_count_is_the_models_error_with_a_note(entry):
    decoy, _ = _decoy()
    x = _images(3, c=1, size=8)
    if entry == "evaluate_model":
        split = Split(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), [])
        fn = lambda: evaluate_model(  # noqa: E731
            decoy, split, mean=(0.5,), std=(0.2,), methods="gradcam", metrics="ad", progress=False
        )
    elif entry == "confidence_metrics":
        fn = lambda: confidence_metrics(decoy, x, _maps(), Y, mean=(0.5,), std=(0.2,), batch_size=4)  # noqa: E731
    else:
        fn = lambda: ENTRY[entry](decoy, x, Y)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"\[\d+, 1, 8, 8\].*3 channels") as info:  # torch's own message
        fn()
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and re.fullmatch(
        r"igrad: raised by Decoy on input of shape \(\d+, 1, 8, 8\) \(torch.float32\)", notes[0]
    ), notes
