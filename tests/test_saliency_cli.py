"""`igrad explain` and the pictures of igrad.visualize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import igrad
from igrad.checkpoint import save_checkpoint
from igrad.cli import main
from igrad.errors import IgradError
from igrad.saliency import signed_map
from igrad.visualize import (
    cam_overlay,
    denormalize,
    explain,
    explanation_figure,
    qualitative_figure,
    save_image,
    signed_image,
)

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
CLASSES = [f"class{i}" for i in range(10)]


def _checkpoint(path, seed, **changes):
    torch.manual_seed(seed)
    config = {
        "model": "cifar_resnet18",
        "model_kwargs": {"width": 0.125},
        "num_classes": 10,
        "mean": MEAN,
        "std": STD,
        "classes": CLASSES,
        **changes,
    }
    model = igrad.create_model("cifar_resnet18", num_classes=config["num_classes"], width=0.125)
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return model.eval()


@pytest.fixture()
def setup(tmp_path):
    base = _checkpoint(tmp_path / "base" / "best.pt", 0)
    reg = _checkpoint(tmp_path / "reg" / "best.pt", 1)
    rng = np.random.default_rng(0)
    images = []
    for name, size in [("cat.png", 40), ("dog.png", 32)]:
        save_image(tmp_path / name, rng.random((size, size, 3)))
        images.append(str(tmp_path / name))
    return tmp_path, base, reg, images


def test_explain_compare_writes_overlays_grid_and_summary(setup, capsys):
    tmp, base, _reg, images = setup
    out = tmp / "out"
    rc = main([
        "explain", "--checkpoint", str(tmp / "base" / "best.pt"), "--compare", str(tmp / "reg" / "best.pt"),
        *images, "--methods", "gradcam,guided", "--target", "class3", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    for label in ("base", "reg"):
        for stem in ("cat", "dog"):
            for method in ("gradcam", "guided"):
                img = imread(out / label / f"{stem}_{method}.png")
                assert img.shape[:2] == (224, 224)  # 32 px, enlarged 7x
    grid = imread(out / "grid.png")
    assert grid.shape[0] > 300 and grid.shape[1] > 300
    summary = json.loads((out / "explain.json").read_text())
    assert summary["target"] == [3, 3] and summary["methods"] == ["gradcam", "guided"]
    assert summary["signed"] == {"gradcam": False, "guided": True}
    assert set(summary["predicted"]) == {"base", "reg"} and "provenance" in summary
    assert "wrote 9 images" in capsys.readouterr().out

    # the overlay is the JET blend of the gradcam map of the base model on the resized, normalised image
    from PIL import Image
    from torchvision.transforms.v2.functional import resize

    raw = []
    for path in images:
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        raw.append(resize(pixels, [32, 32], antialias=True).float() / 255)
    raw = torch.stack(raw)
    x = (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():  # each checkpoint's own prediction, named (a plain eval-mode forward)
        for label, model in (("base", base), ("reg", _reg)):
            pred = model.eval()(x).argmax(1).tolist()
            assert summary["predicted"][label] == pred
            assert summary["predicted_names"][label] == [CLASSES[c] for c in pred]
    cam = igrad.saliency.create_method("gradcam", base)(x, 3)
    expected = cam_overlay(raw[0], cam[0]).repeat(7, 0).repeat(7, 1)
    diff = np.abs(imread(out / "base" / "cat_gradcam.png")[..., :3] - expected)
    # PNG rounding (1/255); a map value on a colour-table boundary may flip one step of the 256-entry JET table
    assert (diff <= 1 / 255 + 1e-6).mean() > 0.99 and diff.max() < 0.02


@pytest.mark.parametrize("changes,match", [
    ({"num_classes": 5, "classes": CLASSES[:5]}, "5 classes vs 10"),
    ({"classes": CLASSES[::-1]}, "different class names"),
    ({"mean": [0.4, 0.4, 0.4]}, "normalisation mean/std"),
    ({"std": [0.2, 0.2, 0.2]}, "normalisation mean/std"),
    ({"image_shape": [3, 64, 64]}, "input size (64, 64) vs (32, 32)"),
    ({"image_shape": [1, 32, 32]}, "1 image channels vs 3"),
])  # fmt: skip
def test_explain_compare_refuses_a_checkpoint_of_other_inputs_or_classes(setup, capsys, changes, match):
    """Both rows are drawn from the first checkpoint's inputs and class names: a second checkpoint that reads
    other inputs or names other classes is a clear error, not a silently wrong row."""
    tmp, _, _, images = setup
    _checkpoint(tmp / "other" / "best.pt", 2, **changes)
    args = ["explain", "--checkpoint", str(tmp / "base" / "best.pt"), "--compare", str(tmp / "other" / "best.pt")]
    assert main([*args, *images, "--methods", "gradcam", "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot be drawn beside" in err and match in err and "Traceback" not in err
    assert not (tmp / "o" / "grid.png").exists()


def test_explain_compare_with_size_given_accepts_other_trained_sizes(setup, capsys):
    """--size prepares the images for both rows: the checkpoints' trained sizes may then differ."""
    tmp, _, _, images = setup
    _checkpoint(tmp / "big" / "best.pt", 2, image_shape=[3, 64, 64])
    args = ["explain", "--checkpoint", str(tmp / "base" / "best.pt"), "--compare", str(tmp / "big" / "best.pt")]
    assert main([*args, *images, "--methods", "gradcam", "--size", "48", "--out", str(tmp / "o")]) == 0
    assert json.loads((tmp / "o" / "explain.json").read_text())["image_size"] == [48, 48]


@pytest.mark.parametrize("extra,match", [
    (["--methods", "gradcm"], "unknown saliency method 'gradcm'"),
    (["--target", "1,2,3"], "3 classes for 2 images"),
    (["--target", "zebra"], "neither a class index nor a class name"),
    (["--target-layer", "layer9"], "no target layer 'layer9'"),
    (["--methods", "cam", "--target", "10"], "out of range"),
])  # fmt: skip
def test_explain_errors(setup, capsys, extra, match):
    tmp, _, _, images = setup
    rc = main(["explain", "--checkpoint", str(tmp / "base" / "best.pt"), *images, "--out", str(tmp / "o"), *extra])
    assert rc == 2
    assert match in capsys.readouterr().err


#: Classes named by numbers and sorted as strings, as an image folder of numbered class folders gives them.
NUMBERED = sorted(str(i) for i in range(1, 13))  # ['1', '10', '11', '12', '2', ..., '9']


def test_target_tokens_of_numbered_classes_mean_the_class_they_name():
    """Every token over numbered classes, against the rule written out: a class name means that class, and a
    name that is also the index of another class is refused naming both; name:/index: choose one reading."""
    from igrad.cli.explain import _parse_target

    assert NUMBERED[:5] == ["1", "10", "11", "12", "2"]
    for index, name in enumerate(NUMBERED):
        other = int(name)
        if other < len(NUMBERED) and other != index:  # both a name and another class's index
            with pytest.raises(IgradError, match="ambiguous") as err:
                _parse_target(name, 1, NUMBERED, 12)
            text = str(err.value)
            assert f"name of class {index}" in text and f"index of class {other} ({NUMBERED[other]!r})" in text
        else:
            assert _parse_target(name, 1, NUMBERED, 12) == [index]
        assert _parse_target(f"name:{name}", 1, NUMBERED, 12) == [index]
        assert _parse_target(f"index:{index}", 1, NUMBERED, 12) == [index]
    assert _parse_target("12", 2, NUMBERED, 12) == [3, 3]  # the class '12', not an out-of-range index
    assert _parse_target("12,name:2", 2, NUMBERED, 12) == [3, 4]
    # names that are not numbers, and numbers that name no class, are read as before
    assert _parse_target("class3,4", 2, CLASSES, 10) == [3, 4]
    assert _parse_target("1", 1, None, 10) == [1]
    for bad, match in (("index:12", "out of range"), ("13", "out of range"), ("name:13", "neither")):
        with pytest.raises(IgradError, match=match):
            _parse_target(bad, 1, NUMBERED, 12)


def test_explain_target_names_a_numbered_class(tmp_path, capsys):
    """igrad explain --target 12 explains the class named '12' (index 3); --target 2 is refused, naming both
    readings; --target name:2 explains the class named '2' (index 4)."""
    _checkpoint(tmp_path / "num" / "best.pt", 0, num_classes=12, classes=NUMBERED)
    save_image(tmp_path / "a.png", np.random.default_rng(0).random((32, 32, 3)))
    args = ["explain", "--checkpoint", str(tmp_path / "num" / "best.pt"), str(tmp_path / "a.png")]
    args += ["--methods", "gradcam"]
    assert main([*args, "--target", "12", "--out", str(tmp_path / "o12")]) == 0
    summary = json.loads((tmp_path / "o12" / "explain.json").read_text())
    assert summary["target"] == [3] and summary["class_names"] == ["12"]
    assert main([*args, "--target", "2", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "name of class 4" in err and "index of class 2 ('11')" in err
    assert main([*args, "--target", "name:2", "--out", str(tmp_path / "n2")]) == 0
    assert json.loads((tmp_path / "n2" / "explain.json").read_text())["class_names"] == ["2"]


def test_explain_missing_inputs(setup, capsys):
    tmp, _, _, images = setup
    (tmp / "bad.png").write_bytes(b"not a png")
    assert (
        main(["explain", "--checkpoint", str(tmp / "base" / "best.pt"), str(tmp / "bad.png"), "--out", str(tmp / "o")])
        == 2
    )
    assert "cannot read image" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(tmp / "nope.pt"), *images, "--out", str(tmp / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(tmp / "base" / "best.pt"), "nope.png", "--out", str(tmp / "o")]) == 2
    assert "image nope.png does not exist" in capsys.readouterr().err


def test_qualitative_figure_layout(setup):
    tmp, base, reg, _ = setup
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    methods = ["gradient", "guided", "gradcam", "scorecam"]
    fig = qualitative_figure(
        {"baseline": base, "regularised": reg}, x, [1, 2, 3], methods, MEAN, STD, tmp / "q.png", class_names=CLASSES
    )
    axes = fig.get_axes()
    assert len(axes) == 3 * 2 * (1 + len(methods))  # rows: image × model; columns: image + methods
    assert [a.get_title() for a in axes[:5]] == ["image", *methods]
    with torch.no_grad():  # each row names the model's own prediction (plain eval-mode forward)
        pred = {k: m.eval()(x).argmax(1) for k, m in (("baseline", base), ("regularised", reg))}
    assert axes[0].get_ylabel() == f"baseline\nexplains: {CLASSES[1]}\npred: {CLASSES[pred['baseline'][0]]}"
    assert axes[5].get_ylabel() == f"regularised\nexplains: {CLASSES[1]}\npred: {CLASSES[pred['regularised'][0]]}"
    assert imread(tmp / "q.png").shape[2] in (3, 4)
    # the images' true classes given: the true class too (image 2 of 3: rows 2 and 3, first column)
    labels = torch.tensor([1, 2, 3])
    models = {"baseline": base, "regularised": reg}
    fig = qualitative_figure(models, x, labels, methods, MEAN, STD, class_names=CLASSES, labels=labels)
    axes = fig.get_axes()
    assert axes[2 * 5].get_ylabel() == f"baseline\ntrue: {CLASSES[2]}\npred: {CLASSES[pred['baseline'][1]]}"
    assert axes[3 * 5].get_ylabel() == f"regularised\ntrue: {CLASSES[2]}\npred: {CLASSES[pred['regularised'][1]]}"
    # a tensor of explained classes alone is not called the truth: the row says which class its maps explain
    fig = qualitative_figure(models, x, torch.tensor([4, 0, 2]), methods, MEAN, STD, class_names=CLASSES)
    axes = fig.get_axes()
    assert axes[2 * 5].get_ylabel() == f"baseline\nexplains: {CLASSES[0]}\npred: {CLASSES[pred['baseline'][1]]}"
    assert not any("true:" in a.get_ylabel() for a in axes)
    with pytest.raises(IgradError, match="labels must be"):
        qualitative_figure(models, x, labels, methods, MEAN, STD, labels=labels[:2])


def test_explanation_figure_says_what_each_row_label_is(setup):
    # a class under a model's name reads as that model's prediction: every row says "explains:", and with
    # the models' predictions given, "pred:" too (igrad explain --compare explains the first model's class)
    _, base, reg, _ = setup
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    norm = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    rows = [(k, explain(m, norm, [4, 7], ["gradcam"])) for k, m in (("base", base), ("reg", reg))]
    axes = explanation_figure(x, rows, class_names=CLASSES).get_axes()
    assert [axes[i].get_ylabel() for i in (0, 2, 4, 6)] == [
        f"base\nexplains: {CLASSES[4]}", f"reg\nexplains: {CLASSES[4]}",
        f"base\nexplains: {CLASSES[7]}", f"reg\nexplains: {CLASSES[7]}",
    ]  # fmt: skip
    predictions = {"base": torch.tensor([1, 2]), "reg": torch.tensor([3, 5])}
    axes = explanation_figure(x, rows, class_names=CLASSES, predictions=predictions).get_axes()
    assert axes[2].get_ylabel() == f"reg\nexplains: {CLASSES[4]}\npred: {CLASSES[3]}"
    assert axes[4].get_ylabel() == f"base\nexplains: {CLASSES[7]}\npred: {CLASSES[2]}"
    # no class names: the index; the true classes alone replace "explains:"
    axes = explanation_figure(x, rows, true_labels=torch.tensor([0, 9])).get_axes()
    assert axes[2].get_ylabel() == "reg\ntrue: class 0" and axes[4].get_ylabel() == "base\ntrue: class 9"
    assert explanation_figure(x, rows).get_axes()[0].get_ylabel() == "base\nexplains: class 4"
    with pytest.raises(IgradError, match=r"predictions\['reg'\] must hold one class per image \[2\], got shape \(1,\)"):
        explanation_figure(x, rows, predictions={"base": torch.tensor([1, 2]), "reg": torch.tensor([3])})
    with pytest.raises(IgradError, match=r"true_labels must hold one class per image"):
        explanation_figure(x, rows, true_labels=torch.tensor([[0, 1]]))


def test_overlay_and_signed_pictures_hand_computed():
    image = torch.full((3, 2, 2), 0.2)
    cam = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    out = cam_overlay(image, cam)
    from matplotlib import colormaps

    jet = colormaps["jet"]
    assert np.allclose(out[0, 1], 0.5 * np.array(jet(1.0)[:3]) + 0.1)
    assert np.allclose(out[0, 0], 0.5 * np.array(jet(0.0)[:3]) + 0.1)
    attr = torch.tensor([[[[1.0, -4.0]], [[-2.0, 0.0]]]])  # [1, 2, 1, 2]: per pixel, the channel of largest |.|
    assert torch.equal(signed_map(attr), torch.tensor([[[-0.5, -1.0]]]))
    pic = signed_image(torch.tensor([[-1.0, 0.0, 1.0]]))
    assert pic[0, 0, 2] > pic[0, 0, 0] and pic[0, 2, 0] > pic[0, 2, 2]  # blue negative, red positive
    assert np.allclose(pic[0, 1], pic[0, 1].mean(), atol=0.05)  # 0 is (nearly) white/grey
    x = torch.tensor([[[[0.0]], [[1.0]], [[-10.0]]]])
    assert torch.allclose(denormalize(x, MEAN, STD), torch.tensor([[[[0.5]], [[0.6]], [[0.0]]]]))
