"""The model registry carries each model's metadata: default target layer and input size,
for registered and torchvision models; no attribute is set on the instances it builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igrad
from igrad.models import MODELS, model_info, register_model


def test_registered_and_torchvision_models_have_metadata():
    r18, mnv2 = model_info("cifar_resnet18"), model_info("cifar_mobilenet_v2")
    assert (r18.default_target_layer, r18.input_size) == ("layer4", (3, 32, 32))
    assert (mnv2.default_target_layer, mnv2.input_size) == ("features.18", (3, 32, 32))
    tv = model_info("tv:resnet18")
    assert tv.input_size == (3, 224, 224) and tv.default_target_layer is None  # by torchvision's conventions
    with pytest.raises(igrad.IgradError, match="unknown torchvision model 'resnet181'"):
        model_info("tv:resnet181")
    with pytest.raises(igrad.IgradError, match="unknown model 'cifar_resnet81'"):
        model_info("cifar_resnet81")
    for name, width in (("cifar_resnet18", 0.125), ("cifar_mobilenet_v2", 0.5)):
        model = igrad.create_model(name, num_classes=3, width=width)
        assert not hasattr(model, "igrad_target_layer")
        assert igrad.default_target_layer(model) == model_info(name).default_target_layer
        model.get_submodule(igrad.default_target_layer(model))  # names a real module


class _TwoStages(nn.Module):
    """The last convolution sits in ``late``, but the registered target layer is ``early``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.early = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.late(self.early(x)).mean((2, 3)))


def test_register_model_metadata_is_what_default_target_layer_gives():
    if "test_two_stages" not in MODELS:
        register_model("test_two_stages", default_target_layer="early", input_size=(3, 16, 16))(_TwoStages)
    model = igrad.create_model("test_two_stages", num_classes=2)
    assert igrad.default_target_layer(model) == "early"
    assert igrad.default_target_layer(nn.DataParallel(model)) == "module.early"
    assert igrad.default_target_layer(_TwoStages()) == "late"  # built elsewhere: torchvision's conventions
    assert model_info("test_two_stages").input_size == (3, 16, 16)
    with pytest.raises(igrad.IgradError, match="already registered"):
        register_model("test_two_stages")(_TwoStages)
    with pytest.raises(igrad.IgradError, match="torchvision's"):
        register_model("tv:mine")(_TwoStages)


def test_default_layer_leaves_out_auxiliary_heads_that_run_only_in_training():
    # GoogLeNet's aux1/aux2 and Inception-v3's AuxLogits hold the last convolutions in registration order,
    # but an eval-mode forward never calls them: the default must be the last stage that runs
    import torchvision

    from igrad.saliency import create_method

    googlenet = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    assert igrad.default_target_layer(googlenet) == "inception5b"
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    assert igrad.default_target_layer(inception) == "Mixed_7c"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with create_method("gradcam", googlenet) as m:  # runs at the default layer (it used to fail at aux2)
        assert m.layer_name == "inception5b"
        assert m(x, 3).shape == (1, 64, 64)


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("mobilenet_v2", "classifier.1")])
def test_torchvision_pretrained_weights_start_a_run_with_a_new_head(monkeypatch, name, head):
    """``--weights DEFAULT`` (``TrainConfig.weights``; the tv: counterpart of ``--init``): every weight but the
    head is torchvision's pretrained one, the 1000-class head replaced by a fresh one of the run's class count.
    torchvision's download is replaced by a seeded state dict (nothing is downloaded)."""
    import torchvision

    torch.manual_seed(0)
    pretrained = torchvision.models.get_model(name, num_classes=1000).state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return {k: v.clone() for k, v in pretrained.items()}

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    from igrad.train import TrainConfig

    config = TrainConfig(model=f"tv:{name}", weights="DEFAULT")
    model = igrad.create_model(config.model, num_classes=7, **config.model_kwargs)
    assert urls == [torchvision.models.get_model_weights(name).DEFAULT.url]
    state = model.state_dict()
    assert set(state) == set(pretrained)
    for key, value in pretrained.items():
        if key.startswith(head + "."):
            assert state[key].shape[0] == 7  # the new head: 7 classes
        else:
            assert torch.equal(state[key], value), key
