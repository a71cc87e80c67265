"""Class names of a folder vs a trained model: a folder's labels are renumbered to the
checkpoint's classes by name wherever the two meet (evaluate, reproduce's evaluation, resuming a run).

References are written here: the checkpoint's class list, the indices of the folder's names in it, and
accuracies computed from the model's own predictions with those indices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import igrad
from igrad.checkpoint import load_model, save_checkpoint
from igrad.cli import main
from igrad.data import load_split, match_classes
from igrad.errors import IgradError
from igrad.train import TrainConfig, fit
from references import write_folder

CLASSES = ["apple", "bee", "cat", "dog"]  # the model's classes, in its output order
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.3]
N = 3  # images per class


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / "test" / name).mkdir(parents=True)
        for i in range(N):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "test" / name / f"{i}.png")
    return root


def _checkpoint(path: Path, classes: list[str] | None = CLASSES, favour: int = 1) -> Path:
    """A random 4-class network whose head strongly favours class ``favour`` (so that its accuracy
    depends on which labels the images get)."""
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=4, width=0.125)
    with torch.no_grad():
        model.fc.weight.mul_(1e-3)
        model.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(favour), 4).float() * 10)
    config = {"model": "cifar_resnet18", "model_kwargs": {"width": 0.125}, "num_classes": 4, "mean": MEAN, "std": STD}
    if classes is not None:
        config["classes"] = classes
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path


def _predictions(ckpt: Path, root: Path, names: list[str]) -> list[int]:
    """The model's predictions on the folder's images in its order (sorted names, sorted files), read
    with PIL and normalised here."""
    model, _ = load_model(ckpt)
    preds = []
    for name in sorted(names):
        for i in range(N):
            pixels = np.asarray(Image.open(root / "test" / name / f"{i}.png").convert("RGB"), dtype=np.float32) / 255
            x = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[
                :, None, None
            ]
            with torch.no_grad():
                preds.append(int(model(x[None]).argmax(1)))
    return preds


def test_subset_in_another_order_maps_to_the_checkpoint_indices(tmp_path):
    root = _folder(tmp_path / "data", ["dog", "bee"])
    split = load_split(root, "test")
    assert split.classes == ["bee", "dog"] and split.labels.tolist() == [0] * N + [1] * N  # the folder's own
    mapped = match_classes(split, CLASSES, 4)
    assert mapped.labels.tolist() == [1] * N + [3] * N  # bee = 1, dog = 3 in CLASSES
    assert mapped.classes == CLASSES and torch.equal(mapped.images, split.images)
    assert match_classes(load_split(_folder(tmp_path / "all", CLASSES), "test"), CLASSES, 4).labels.tolist() == [
        c for c in range(4) for _ in range(N)
    ]


def test_evaluate_uses_the_checkpoint_indices(tmp_path):
    root = _folder(tmp_path / "data", ["dog", "bee"])
    ckpt = _checkpoint(tmp_path / "best.pt", favour=1)  # predicts "bee" for every image
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--methods", "gradient", "--metrics", "ad"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    labels = [1] * N + [3] * N
    assert res["per_sample"]["target"] == [labels[i] for i in res["data"]["indices"]]
    preds = _predictions(ckpt, root, ["dog", "bee"])
    assert preds == [1] * (2 * N)
    assert res["model"]["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels, strict=True)) / (2 * N))
    assert res["model"]["accuracy"] == pytest.approx(0.5)  # the bee half is right (positional labels gave 0)


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (["bee", "kat"], ["'kat'", "did you mean 'cat'"]),
        (["apple", "tiger", "worm"], ["'tiger'", "'worm'", "apple, bee, cat, dog"]),
    ],
)
def test_unknown_class_is_refused_naming_it(tmp_path, capsys, names, words):
    root = _folder(tmp_path / "data", names)
    with pytest.raises(IgradError) as info:
        match_classes(load_split(root, "test"), CLASSES, 4, source="the folder", model="the checkpoint")
    assert all(w in str(info.value) for w in words)
    ckpt = _checkpoint(tmp_path / "best.pt")
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(root), "--no-progress", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and str(ckpt) in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_checkpoint_without_names(tmp_path):
    split = load_split(_folder(tmp_path / "all", CLASSES), "test")
    with pytest.warns(UserWarning, match="by sorted position"):
        same = match_classes(split, None, 4)
    assert same.labels.tolist() == [c for c in range(4) for _ in range(N)]
    subset = load_split(_folder(tmp_path / "two", ["dog", "bee"]), "test")
    with pytest.raises(IgradError, match="stores no class names and has 4 classes, but .* has 2 .*bee, dog"):
        match_classes(subset, None, 4, model="checkpoint x")
    with pytest.raises(IgradError, match="names 3 classes but has 4 outputs"):
        match_classes(split, CLASSES[:3], 4)


def test_resume_refuses_a_folder_whose_classes_changed(tmp_path):
    folder = write_folder(tmp_path / "data", n_train=4, n_test=2, size=8)
    config = TrainConfig.preset_config(
        "cpu", data=str(folder), width=0.125, epochs=1, batch_size=8, lam=0.0, cos_samples=0, threads=1,
        steps_per_epoch=1, out=str(tmp_path / "run"),
    )  # fmt: skip
    fit(config, quiet=True)
    for split in ("train", "test"):
        (folder / split / "ant").rename(folder / split / "ants")
    with pytest.raises(IgradError, match=r"classes of .* changed .*new: \['ants'\]; missing: \['ant'\]"):
        fit(config.replace(epochs=2), resume=tmp_path / "run", quiet=True)
