"""Saliency maps against independent references: pytorch-grad-cam, hand-computed values, straightforward
loops written here, and the core gradient engine.

Tolerance for the pytorch-grad-cam parity: 1e-5 absolute on maps in [0, 1]. The remaining differences are
float32 rounding, their ``1e-7`` in the min-max denominator (a relative ``1e-7 / (max − min)``), and their
OpenCV resize, which :func:`test_upsample_equals_opencv_resize` shows equals our bilinear upsampling to
3e-7 on every shape used here, so interpolation is accounted for separately rather than absorbed by the
tolerance. Where our definition differs from theirs (gradcam++ ``eps``, scorecam mask upsampling) the
parity test uses the option that reproduces theirs, and the default is checked against a reference here.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igrad
from igrad.saliency import create_method, normalize_maps, upsample
from references import F32_KERNEL_RTOL, brute_ablationcam, kernel_atol, noise_seed, random_batchnorm

pgc = pytest.importorskip("pytorch_grad_cam")
cv2 = pytest.importorskip("cv2")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

ATOL = 1e-5

# (our name, their class, our options that reproduce their definition)
PAIRS = [
    ("gradcam", "GradCAM", {}),
    ("gradcam++", "GradCAMPlusPlus", {"eps": 1e-6}),
    ("xgradcam", "XGradCAM", {}),
    ("layercam", "LayerCAM", {}),
    ("scorecam", "ScoreCAM", {"mask_align_corners": True}),
    ("ablationcam", "AblationCAM", {}),
]


def _theirs(cls_name, model, layer, x, targets, **attrs):
    cls = getattr(pgc, cls_name)
    with contextlib.redirect_stderr(io.StringIO()), cls(model, [layer]) as cam:  # their tqdm bars
        for k, v in attrs.items():
            setattr(cam, k, v)
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in targets]))


@pytest.fixture(scope="module")
def tv_resnet():
    torch.manual_seed(0)
    return igrad.create_model("tv:resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def cifar_resnet():
    torch.manual_seed(1)
    return igrad.create_model("cifar_resnet18", num_classes=10, width=0.25).eval()


def test_upsample_equals_opencv_resize():
    """The only interpolation in both pipelines: our bilinear upsampling vs their cv2.resize."""
    g = torch.Generator().manual_seed(0)
    for (h, w), size in [((2, 2), (64, 64)), ((2, 2), (48, 48)), ((4, 4), (32, 32)), ((3, 5), (40, 50))]:
        m = torch.rand(1, h, w, generator=g)
        ref = cv2.resize(m[0].numpy(), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        assert np.abs(upsample(m, size)[0].numpy() - ref).max() < 3e-7


@pytest.mark.parametrize("name,cls_name,options", PAIRS, ids=[p[0] for p in PAIRS])
def test_parity_torchvision_resnet18(tv_resnet, name, cls_name, options):
    # Score-CAM (both libraries) and their Ablation-CAM run the whole network B·K times: to keep this fast they
    # are compared at layer3 (K = 256, 2×2 at 32×32 input) on a batch of 2; the others at layer4 (2×2 at 64×64).
    layer, b, size = ("layer3", 2, 32) if name in ("scorecam", "ablationcam") else ("layer4", 4, 64)
    x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 3, 5, 7][:b])
    with create_method(name, tv_resnet, layer, **options) as m:
        ours = m(x, targets)
    theirs = _theirs(cls_name, tv_resnet, tv_resnet.get_submodule(layer), x, targets, batch_size=128)
    assert ours.shape == theirs.shape == (b, size, size)
    assert (ours.amax(dim=(1, 2)) == 1).sum() >= b // 2  # not vacuous (ReLU may zero a whole Grad-CAM map)
    assert (ours - theirs).abs().max() < ATOL


@pytest.mark.parametrize("name,cls_name,options", PAIRS, ids=[p[0] for p in PAIRS])
def test_parity_cifar_resnet18(cifar_resnet, name, cls_name, options):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 2, 4, 9])
    with create_method(name, cifar_resnet, **options) as m:  # default layer: layer4 (4×4)
        assert m.layer_name == "layer4"
        ours = m(x, targets)
    theirs = _theirs(cls_name, cifar_resnet, cifar_resnet.layer4, x, targets)
    assert (ours.amax(dim=(1, 2)) == 1).sum() >= 2
    assert (ours - theirs).abs().max() < ATOL


def _activation(model, layer, x):
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        h.remove()
    return store[0], logits


def test_scorecam_default_masks_reference():
    """Default Score-CAM (masks upsampled with align_corners=False) against masks built one at a time."""
    torch.manual_seed(4)
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = [5, 6]
    a, _ = _activation(model, model.layer4, x)
    ref = []
    with torch.no_grad():
        for i in range(2):
            masks = []
            for k in range(a.shape[1]):
                up = F.interpolate(a[i : i + 1, k : k + 1], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
                span = up.max() - up.min()
                masks.append((up - up.min()) / span if span > 0 else torch.zeros_like(up))
            scores = model(x[i] * torch.stack(masks)[:, None])[:, t[i]]  # s_k = y_c(x ⊙ M_k)
            w = torch.softmax(scores, 0)
            ref.append(F.relu((w[:, None, None] * a[i]).sum(0)))
    expected = normalize_maps(upsample(torch.stack(ref), (32, 32)))
    with create_method("scorecam", model, batch_size=37) as m:  # a batch size that splits images
        ours = m(x, t)
    assert (ours.amax(dim=(1, 2)) == 1).all()
    assert (ours - expected).abs().max() < 1e-5
    with create_method("scorecam", model, mask_align_corners=True) as m:
        assert (m(x, t) - ours).abs().max() > 1e-3  # the documented difference is real


def test_gradcampp_default_reference(cifar_resnet):
    """Default Grad-CAM++ (formula of docs/method.md, no eps) against the formula written out with numpy."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1, 8])
    store = []
    h = cifar_resnet.layer4.register_forward_hook(lambda m, i, o: store.append(o))
    try:
        logits = cifar_resnet(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store[0])
    a, g = store[0].detach().double().numpy(), g.double().numpy()
    maps = []
    for i in range(2):
        s = np.zeros(a.shape[2:])
        for k in range(a.shape[1]):
            gk, ak = g[i, k], a[i, k]
            den = 2 * gk**2 + ak.sum() * gk**3
            aij = np.where((gk != 0) & (den != 0), gk**2 / np.where(den != 0, den, 1), 0)
            s += (aij * np.maximum(gk, 0)).sum() * ak
        maps.append(np.maximum(s, 0))
    expected = normalize_maps(upsample(torch.tensor(np.array(maps), dtype=torch.float32), (32, 32)))
    with create_method("gradcam++", cifar_resnet) as m:
        assert (m(x, t) - expected).abs().max() < 1e-5


class _TinyCAMNet(nn.Module):
    """features (avg-pool 2×2 when ``pool``) -> global average pool -> linear, with hand-set weights."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.features = nn.AvgPool2d(2) if pool else nn.Identity()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        self.igrad_target_layer = "features"

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(self.features(x)), 1))


def test_cam_hand_computed():
    # A = x: A_0 = [[1, 0], [0, 2]], A_1 = [[0, 1], [1, 0]]
    x = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    with create_method("cam", _TinyCAMNet(pool=False)) as m:
        # class 0: S = 1·A_0 + 2·A_1 = [[1, 2], [2, 2]] -> [[0, 1], [1, 1]]
        assert torch.allclose(m(x, 0)[0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        # class 1: S = −A_0 = [[−1, 0], [0, −2]] -> (S + 2) / 2; no ReLU (it would give an all-zero map)
        assert torch.allclose(m(x, 1)[0], torch.tensor([[0.5, 1.0], [1.0, 0.0]]))


def test_cam_hand_computed_upsampled():
    # 4×4 input, avg-pool 2 -> A 2×2; each 2×2 block of channel 0 averages to [[1, 0], [0, 2]], channel 1 to
    # [[0, 1], [1, 0]]: class 0 gives S = [[1, 2], [2, 2]] -> [[0, 1], [1, 1]], then bilinear to 4×4
    # (align_corners=False: the 1-D profile of [a, b] is [a, .75a + .25b, .25a + .75b, b]).
    a0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    a1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    x = torch.stack([a0, a1])[None]
    r0 = [0.0, 0.25, 0.75, 1.0]
    r3 = [1.0, 1.0, 1.0, 1.0]
    r1 = [0.75 * p + 0.25 * q for p, q in zip(r0, r3, strict=True)]
    r2 = [0.25 * p + 0.75 * q for p, q in zip(r0, r3, strict=True)]
    with create_method("cam", _TinyCAMNet(pool=True)) as m:
        assert torch.allclose(m(x, 0)[0], torch.tensor([r0, r1, r2, r3]))


def test_guided_mobilenet_v2_equals_core_engine():
    torch.manual_seed(6)
    model = igrad.create_model("cifar_mobilenet_v2", num_classes=10, width=0.25).eval()
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([3, 4])
    engine_guided = igrad.gradient(model, x, t, guided=True)
    engine_plain = igrad.gradient(model, x, t)
    with create_method("guided", model) as g, create_method("gradient", model) as p:
        guided, plain = g.attribute(x, t), p.attribute(x, t)
        guided_map = g(x, t)
        plain_map = p(x, t)
    assert torch.equal(guided, engine_guided)
    assert torch.equal(plain, engine_plain)
    assert torch.allclose(guided_map, normalize_maps(engine_guided.abs().amax(1)))
    cos = F.cosine_similarity(guided.flatten(1), plain.flatten(1))
    assert (cos < 0.95).all()  # ReLU6 rule applied: the guided gradient is not the plain one
    assert (guided_map - plain_map).abs().max() > 0.1


def test_guided_gradcam_is_guided_times_gradcam(cifar_resnet):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([2, 7])
    theirs_gradcam = _theirs("GradCAM", cifar_resnet, cifar_resnet.layer4, x, t)
    expected = igrad.gradient(cifar_resnet, x, t, guided=True) * theirs_gradcam[:, None]
    with create_method("guided-gradcam", cifar_resnet) as m:
        attr = m.attribute(x, t)
        maps = m(x, t)
    assert torch.allclose(attr, expected, atol=1e-5 * float(expected.abs().max()))
    assert torch.allclose(maps, normalize_maps(expected.abs().amax(1)), atol=1e-4)


def test_smoothgrad_reference_loop(cifar_resnet):
    """SmoothGrad against a one-copy-at-a-time loop drawing the documented noise (one [n, C, H, W] block per
    image from a generator seeded with a hash of ``seed`` and the image's values), for several batch sizes;
    noise_level 0 gives the gradient."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([1, 2])
    n, seed = 3, 11
    ref = []
    for i in range(2):
        sigma = 0.15 * (x[i].max() - x[i].min())
        noise = torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(noise_seed(seed, x[i])))
        grads = [igrad.gradient(cifar_resnet, (x[i] + sigma * noise[j])[None], t[i : i + 1])[0] for j in range(n)]
        ref.append(torch.stack(grads).mean(0))
    ref = torch.stack(ref)
    for bs in (1, 4, 64):
        with create_method("smoothgrad", cifar_resnet, n_samples=n, seed=seed, batch_size=bs) as m:
            assert torch.allclose(m.attribute(x, t), ref, atol=kernel_atol(ref), rtol=F32_KERNEL_RTOL)
    with create_method("smoothgrad", cifar_resnet, n_samples=2, noise_level=0.0) as m:
        plain = igrad.gradient(cifar_resnet, x, t)  # a batch of 2, the method runs 4 images: other kernels
        assert torch.allclose(m.attribute(x, t), plain, atol=kernel_atol(plain), rtol=F32_KERNEL_RTOL)


def test_ablationcam_split_matches_whole_network_and_skips_early_layers(cifar_resnet):
    """The fx tail gives the same maps as re-running the whole network, and the layers before the target
    layer run once per call, not once per ablation; also for a layer with a bypassing skip connection."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([1, 2, 3])
    calls = []
    h = cifar_resnet.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        for layer in ("layer4", "layer4.0.conv2"):  # the second needs the block's identity/downsample branch
            calls.clear()
            with create_method("ablationcam", cifar_resnet, layer, batch_size=50) as m:
                fast = m(x, t)
                assert m.traced_tail() is not None
            head_runs = 1 if m.traced_tail().needs_externals else 0
            assert calls == [3] * (1 + head_runs)  # the method's forward (+ the head for the bypass), nothing else
            with create_method("ablationcam", cifar_resnet, layer, batch_size=50) as m:
                m._tail_failed = "forced"  # the documented fallback: whole network with the output replaced
                slow = m(x, t)
            assert len(calls) > 3
            assert (fast.amax(dim=(1, 2)) == 1).all()
            reference, tol = brute_ablationcam(cifar_resnet, cifar_resnet.get_submodule(layer), x, t)
            calls.clear()
            assert tol < 0.05, "the comparison would not be able to tell a wrong map (which differs by ~0.1-1)"
            assert (fast - slow).abs().max() <= tol
            assert (reference - fast).abs().max() <= tol
    finally:
        h.remove()


def test_scorecam_packs_masks_into_full_batches(cifar_resnet):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    sizes = []
    h = cifar_resnet.conv1.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        with create_method("scorecam", cifar_resnet, batch_size=100, fold_batchnorm=False) as m:
            m(x, 0)
        plain_sizes = list(sizes)
        sizes.clear()
        with create_method("scorecam", cifar_resnet, batch_size=100, fold_batchnorm=True) as m:
            m(x, 0)
        assert sizes == [3]  # with BatchNorm folded, the masked batches run through the copy, not the model
        sizes.clear()
        with create_method("scorecam", cifar_resnet, batch_size=100) as m:  # auto: too few forwards to fold
            assert 3 * 128 < m.fold_min_forwards
            m(x, 0)
        auto_sizes = list(sizes)
        sizes.clear()
        with create_method("scorecam", cifar_resnet, batch_size=100) as m:  # auto, enough forwards: folds
            m.fold_min_forwards = 3 * 128 // 2
            m(x, 0)
        assert sizes == [3]
    finally:
        h.remove()
    a, _ = _activation(cifar_resnet, cifar_resnet.layer4, x)
    flat = a.flatten(2)
    live = int((flat.amax(2) > flat.amin(2)).sum())  # non-constant channels over all images
    dead = live < a.shape[0] * a.shape[1]
    expected = [3] + [1] * dead + [100] * (live // 100) + ([live % 100] if live % 100 else [])
    assert plain_sizes == expected
    assert auto_sizes == expected


def test_scorecam_folded_batchnorm_parity():
    """The default (BatchNorm folded into the convolutions for the masked forwards) against
    pytorch-grad-cam, which runs the model as is, on a network with non-trivial BatchNorm statistics."""
    torch.manual_seed(5)
    model = random_batchnorm(igrad.create_model("cifar_resnet18", num_classes=10, width=0.25), 6)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([1, 4, 0, 9])
    with create_method("scorecam", model, mask_align_corners=True, fold_batchnorm=True) as m:
        ours = m(x, t)
        assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m._folded.modules())
    theirs = _theirs("ScoreCAM", model, model.layer4, x, t)
    assert (ours - theirs).abs().max() < ATOL


def test_scorecam_refolds_after_a_weight_change():
    torch.manual_seed(8)
    model = random_batchnorm(igrad.create_model("cifar_resnet18", num_classes=10, width=0.25), 9)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    with create_method("scorecam", model, fold_batchnorm=True) as m:
        before = m(x, 3)
        with torch.no_grad():
            model.layer3[0].bn1.running_mean.add_(2.0)  # in place: the cached copy is now stale
        after = m(x, 3)
    with create_method("scorecam", model, fold_batchnorm=False) as m:
        reference = m(x, 3)
    assert (after - reference).abs().max() < ATOL
    assert (before - reference).abs().max() > 1e-3  # the change mattered, so the test can tell


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.bn(self.conv(x)))
        if a.sum() > 0:
            a = a * 2
        return self.fc(a.mean((2, 3)))


def test_scorecam_untraceable_model_falls_back_to_the_model():
    torch.manual_seed(11)
    model = random_batchnorm(_DataDependent(), 12)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    with pytest.warns(UserWarning, match="scoring with the model as is"):
        with create_method("scorecam", model, "bn", fold_batchnorm=True) as m:
            fallback = m(x, 2)
    with create_method("scorecam", model, "bn", fold_batchnorm=False) as m:
        plain = m(x, 2)
    assert torch.equal(fallback, plain)
