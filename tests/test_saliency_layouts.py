"""CAM methods on layers whose output is not ``[B, K, h, w]``: torchvision's Swin (channels-last
``[B, h, w, C]``, known per model), its ViT (``[B, 1 + h·w, D]`` tokens), hand-made models with an explicit
``layout=``, and the refusals.

References: pytorch-grad-cam with its documented ``reshape_transform`` (``swinT_reshape_transform`` fed the
``[B, h·w, C]`` tokens it expects, ``vit_reshape_transform``), Grad-CAM by plain autograd with the
permutation written out, and brute-force Ablation-CAM (a full forward per channel, zeroing the last
dimension). Tolerance 1e-5 on maps in [0, 1] as in test_saliency_parity.py.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torchvision
from torch import nn

import igrad
from igrad import IgradError
from igrad.models import layer_layout
from igrad.saliency import create_method
from references import brute_ablationcam, hand_gradcam

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform, vit_reshape_transform  # noqa: E402

ATOL = 1e-5
PAIRS = [
    ("gradcam", "GradCAM", {}),
    ("gradcam++", "GradCAMPlusPlus", {"eps": 1e-6}),
    ("xgradcam", "XGradCAM", {}),
    ("layercam", "LayerCAM", {}),
    ("scorecam", "ScoreCAM", {"mask_align_corners": True}),
]


def _theirs(cls_name, model, layer, x, targets, reshape):
    cls = getattr(pgc, cls_name)
    with contextlib.redirect_stderr(io.StringIO()), cls(model, [layer], reshape_transform=reshape) as cam:
        cam.batch_size = 128
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(int(t)) for t in targets]))


def _bhwc(t):  # channels-last -> [B, C, h, w], written out
    return t.permute(0, 3, 1, 2)


def _swin_reshape(h, w):  # pytorch-grad-cam's Swin transform expects [B, h·w, C]; torchvision gives [B, h, w, C]
    return lambda t: swinT_reshape_transform(t.flatten(1, 2), height=h, width=w)


def _tokens(h, w):  # class token first, then h·w patch tokens in row-major order
    return lambda t: t[:, 1:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def test_swin_t_gradcam_default_layer():
    """The issue's case: torchvision's Swin-T (random weights), default layer features.7 ([B, 2, 2, 768])."""
    torch.manual_seed(0)
    model = igrad.create_model("tv:swin_t", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # for each image, the first class whose map is not constant (all ≤ 0 before the ReLU gives 0): random
    # weights differ between torch versions, and a constant map would make the comparison empty
    maps = torch.stack(
        [hand_gradcam(model, model.features[7], x, torch.full((2,), c), to_bchw=_bhwc) for c in range(10)]
    )
    t = (maps.amax(dim=(2, 3)) == 1).int().argmax(0)
    with create_method("gradcam", model) as m:
        assert (m.layer_name, m.layout) == ("features.7", "BHWC")
        ours = m(x, t)
    hand = hand_gradcam(model, model.features[7], x, t, to_bchw=_bhwc)
    theirs = _theirs("GradCAM", model, model.features[7], x, t, _swin_reshape(2, 2))
    assert (hand.amax(dim=(1, 2)) == 1).all()
    assert (ours - hand).abs().max() < ATOL
    assert (ours - theirs).abs().max() < ATOL


@pytest.fixture(scope="module")
def tiny_swin():
    torch.manual_seed(2)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=10
    ).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(3)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    ).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: constant logits
    return vit


VIT_LAYER = "encoder.layers.encoder_layer_1.ln_1"  # pytorch-grad-cam's choice for ViT: the last block's first norm


@pytest.mark.parametrize("name,cls_name,options", PAIRS, ids=[p[0] for p in PAIRS])
def test_tiny_swin_every_cam_equals_pytorch_grad_cam(tiny_swin, name, cls_name, options):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([2, 5])
    with create_method(name, tiny_swin, **options) as m:  # default layer features.3: [B, 4, 4, 16]
        assert (m.layer_name, m.layout) == ("features.3", "BHWC")
        ours = m(x, t)
    theirs = _theirs(cls_name, tiny_swin, tiny_swin.features[3], x, t, _swin_reshape(4, 4))
    assert (theirs.amax(dim=(1, 2)) > 0.99).sum() >= 1
    assert (ours - theirs).abs().max() < ATOL


def test_vit_default_target_layer_is_the_last_blocks_first_norm(tiny_vit):
    """Not the patch embedding (conv_proj, its only Conv2d, before every attention block): pytorch-grad-cam's
    documented ViT layer, and the default Grad-CAM equals theirs there."""
    assert igrad.default_target_layer(tiny_vit) == VIT_LAYER
    assert igrad.default_target_layer(nn.DataParallel(tiny_vit)) == "module." + VIT_LAYER
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([1, 7])
    with create_method("gradcam", tiny_vit) as m:
        ours = m(x, t)
    layer = tiny_vit.get_submodule(VIT_LAYER)
    theirs = _theirs("GradCAM", tiny_vit, layer, x, t, lambda a: vit_reshape_transform(a, height=4, width=4))
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("name,cls_name,options", PAIRS, ids=[p[0] for p in PAIRS])
def test_tiny_vit_every_cam_equals_pytorch_grad_cam(tiny_vit, name, cls_name, options):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 7])
    with create_method(name, tiny_vit, VIT_LAYER, **options) as m:  # [B, 1 + 4·4, 16]
        assert m.layout == "tokens"
        ours = m(x, t)
    layer = tiny_vit.get_submodule(VIT_LAYER)
    theirs = _theirs(cls_name, tiny_vit, layer, x, t, lambda a: vit_reshape_transform(a, height=4, width=4))
    assert (theirs.amax(dim=(1, 2)) > 0.99).sum() >= 1
    assert (ours - theirs).abs().max() < ATOL


def test_ablationcam_channels_last_and_tokens_equal_brute_force(tiny_swin, tiny_vit):
    """Ablation zeroes the last dimension (every token of a ViT layer, the class token included)."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([1, 8])
    cases = [(tiny_swin, "features.3", _bhwc), (tiny_vit, VIT_LAYER, _tokens(4, 4))]
    for model, layer, to_bchw in cases:
        expected, tol = brute_ablationcam(model, model.get_submodule(layer), x, t, channel_dim=-1, to_bchw=to_bchw)
        assert tol < 0.05  # a wrong map (wrong channel axis, class token) differs by ~0.1-1
        assert (expected.amax(dim=(1, 2)) == 1).sum() >= 1
        with create_method("ablationcam", model, layer, batch_size=7) as m:
            fast = m(x, t)
            assert m.traced_tail() is not None
        with create_method("ablationcam", model, layer) as m:
            m._tail_failed = "forced"  # the whole-network fallback replaces the output in its own layout
            slow = m(x, t)
        assert (fast - expected).abs().max() <= tol
        assert (slow - expected).abs().max() <= tol


class _HandTokens(nn.Module):
    """Patch embedding -> ``[B, 1 + h·w, D]`` tokens (a learned class token first) -> ``mix`` (the target
    layer, a linear map per token) -> mean of the tokens -> linear. ``class_token=False``: no class token."""

    def __init__(self, class_token: bool = True) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 6)) if class_token else None
        self.mix = nn.Sequential(nn.Linear(6, 6), nn.GELU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.fc(self.mix(tokens).mean(1))


class _HandChannelsLast(nn.Module):
    """conv -> channels-last ``[B, h, w, C]`` -> ``norm`` (the target layer, LayerNorm over C) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_explicit_layout_on_hand_made_models():
    """``layout=`` for models igrad does not know; a non-square token grid follows the input's aspect."""
    torch.manual_seed(7)
    tok, cl = _HandTokens().eval(), _HandChannelsLast().eval()
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(8))  # 4×8 patches, 8×16 maps
    t = torch.tensor([1, 2])
    cases = [
        (tok, "mix", "tokens", lambda a: vit_reshape_transform(a, height=4, width=8)),
        (cl, "norm", "BHWC", _swin_reshape(8, 16)),
    ]
    for model, layer, layout, reshape in cases:
        for name, cls_name, options in (PAIRS[0], PAIRS[4]):
            with create_method(name, model, layer, layout=layout, **options) as m:
                ours = m(x, t)
            theirs = _theirs(cls_name, model, model.get_submodule(layer), x, t, reshape)
            assert (theirs.amax(dim=(1, 2)) > 0.99).sum() >= 1
            assert (ours - theirs).abs().max() < ATOL


def test_outputs_that_are_not_maps_are_refused(tiny_vit):
    x = torch.randn(1, 3, 32, 32)
    unknown = r"'mix' must output feature maps \[B, K, h, w\] for gradcam, got \(1, 17, 6\).*layout='tokens'"
    with pytest.raises(IgradError, match=unknown):
        create_method("gradcam", _HandTokens().eval(), "mix")(x, 0)  # 3-D, no known layout
    with pytest.raises(IgradError, match=r"'mix' outputs \(1, 16, 6\).*16 tokens are not a class token"):
        create_method("gradcam", _HandTokens(class_token=False).eval(), "mix", layout="tokens")(x, 0)
    with pytest.raises(IgradError, match=r"self_attention' must output .*got tuple"):
        create_method("scorecam", tiny_vit, "encoder.layers.encoder_layer_1.self_attention")(x, 0)
    resnet = igrad.create_model("cifar_resnet18", num_classes=4, width=0.125).eval()
    mismatch = r"'layer4' must output \[B, 1 \+ h·w, K\] tokens for layout='tokens', got \(1, 64, 4, 4\)"
    with pytest.raises(IgradError, match=mismatch):
        create_method("ablationcam", resnet, layout="tokens")(x, 0)
    with pytest.raises(IgradError, match="layout must be one of 'BCHW', 'BHWC', 'tokens'"):
        create_method("gradcam", resnet, layout="NHWC")


def test_known_layouts_and_default_layers():
    swin = torchvision.models.swin_t(num_classes=4)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    )
    assert [
        layer_layout(swin, n) for n in ("features.0.0", "features.0", "features.7", "features.7.1.mlp", "norm")
    ] == [
        None,
        "BHWC",
        "BHWC",
        "BHWC",
        "BHWC",
    ]
    assert [layer_layout(swin, n) for n in ("permute", "avgpool", "head")] == [None, None, None]
    assert [layer_layout(vit, n) for n in ("conv_proj", "encoder", "encoder.layers.encoder_layer_0.ln_1")] == [
        None,
        "tokens",
        "tokens",
    ]
    assert layer_layout(nn.DataParallel(swin), "module.features.7") == "BHWC"
    assert layer_layout(torchvision.models.resnet18(), "layer4") is None
    # MaxViT's last convolution sits in `blocks`, an nn.ModuleList that is never called: its last block is
    # (float64: 512 signed terms of Σ α_k A_k cancel, float32 rounding would reach ~1e-5 of the map's span)
    maxvit = igrad.create_model("tv:maxvit_t", num_classes=4).eval().double()
    assert igrad.default_target_layer(maxvit) == "blocks.3"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with create_method("gradcam", maxvit) as m:
        ours = m(x, 1)
    expected = hand_gradcam(maxvit, maxvit.blocks[3], x, [1])
    assert (expected.amax() == 1).all()
    assert (ours - expected).abs().max() < 1e-6
