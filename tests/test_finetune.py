"""Fine-tuning from a checkpoint (``--init``) and λ warm-up (``--lam-warmup``).

Tiny runs as in test_train.py: 4 classes of 12x12 PNG images, CIFAR ResNet-18 at 1/8 width, one thread.
The resume of a run killed mid-warm-up is a case of test_train.py's SIGKILL test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from igrad.checkpoint import load_checkpoint, save_checkpoint
from igrad.cli import main
from igrad.errors import IgradError
from igrad.models import create_model
from igrad.train import TrainConfig, fit, lam_factor, load_init, prepare_data
from references import CLASSES, write_folder
from test_train import assert_same_weights, tiny


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "igrad-cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory) -> Path:
    """A trained baseline (λ = 0, one epoch of 4 steps): the checkpoint the fine-tuning runs start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    fit(tiny(folder, out, lam=0.0, epochs=1, cos_samples=0))
    return out / "last.pt"


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


# --- λ warm-up -----------------------------------------------------------------------------------------


def test_lam_factor_hand_computed():
    # W = 1.5 epochs x 4 steps = 6 steps; step s (0-based) has s/6 until s = 6
    c = TrainConfig(lam_warmup=1.5)
    assert [lam_factor(s, c, 4) for s in range(9)] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1])
    assert lam_factor(0, c, 4) == 0.0 and lam_factor(6, c, 4) == 1.0
    # W is not rounded: 0.3 epochs of 5 steps = 1.5 steps
    c = TrainConfig(lam_warmup=0.3)
    assert [lam_factor(s, c, 5) for s in range(3)] == pytest.approx([0, 1 / 1.5, 1])
    assert all(lam_factor(s, TrainConfig(), 4) == 1.0 for s in range(5))  # no warm-up: λ from the first step


def test_lam_warmup_through_the_trainer(folder, tmp_path):
    # one step per epoch, so each metrics line is one step: W = 2 epochs = 2 steps, λ_eff = 0, λ/2, λ, λ
    r = fit(tiny(folder, tmp_path / "r", epochs=4, steps_per_epoch=1, lam=0.1, lam_warmup=2.0, cos_samples=0))
    assert [h["lam"] for h in r.history] == [0.0, 0.05, 0.1, 0.1]
    for h in r.history:
        assert h["l_r"] is not None and 0 <= h["l_r"] <= 2  # computed (weight 0 at step 0), cosine error in [0, 2]
        assert h["loss"] == pytest.approx(h["l_c"] + h["lam"] * h["l_r"], rel=1e-6)  # L = L_C + λ_eff L_R
    logged = [json.loads(s) for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [h["lam"] for h in logged] == [0.0, 0.05, 0.1, 0.1]
    # without warm-up the log holds λ itself
    r = fit(tiny(folder, tmp_path / "s", epochs=1, steps_per_epoch=1, lam=0.1, cos_samples=0))
    assert r.history[0]["lam"] == 0.1


def test_lam_warmup_must_be_a_finite_non_negative_number(folder, tmp_path, capsys):
    for bad in ("-1", "nan", "inf"):
        rc, err = run_cli(["--data", str(folder), "--lam-warmup", bad, "--out", str(tmp_path / "r")], capsys)
        assert rc == 2 and "lam_warmup must be a finite number >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


# --- fine-tuning: the weights and nothing else ----------------------------------------------------------


def _train_images(folder: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split from the PNG files, normalised by hand (no augmentation in the test below)."""
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for f in sorted((folder / "train" / name).iterdir()):
            images.append(np.array(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), torch.tensor(labels)


def test_init_takes_the_weights_with_a_fresh_optimiser(folder, base, tmp_path):
    # One SGD step on the whole training set (48 images, no augmentation, lr factor 1 at step 0) from the
    # checkpoint's weights, against the same step by hand: w - lr (g + wd w), the first step of a fresh
    # SGD with momentum (buffer = gradient). The trainer's batch is a permutation of the set, so its float32
    # sums are reordered, and train-mode BatchNorm's backward (a difference of means) magnifies such rounding
    # by an amount that depends on the kernels torch picks. So the hand step is taken in float64 (the exact
    # step, for this purpose), and the trainer's float32 step may differ from it by at most 10 times the
    # float32 hand step's own difference from it (the rounding this arithmetic makes here), floored at 1e-6.
    config = tiny(folder, tmp_path / "ft", init=str(base), lam=0.0, epochs=1, batch_size=48, warmup_epochs=0.0)
    config = config.replace(crop_padding=0, flip=False, rotation=0.0, cos_samples=0)
    tuned = fit(config)
    state = load_checkpoint(base)
    cfg = state["config"]
    x, y = _train_images(folder, cfg["mean"], cfg["std"])

    def hand_step(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model = create_model("cifar_resnet18", num_classes=4, width=0.125)
        model.load_state_dict(state["model"])
        model.to(dtype).train()
        F.cross_entropy(model(x.to(dtype)), y, label_smoothing=config.label_smoothing).backward()  # the recipe's L_C
        params = dict(model.named_parameters())
        out = {}
        for name, value in model.state_dict().items():
            if name in params:
                value = value - config.lr * (params[name].grad + config.weight_decay * value)
            out[name] = value.detach()  # BatchNorm buffers: updated by the training-mode forward
        return out

    exact, rounded = hand_step(torch.float64), hand_step(torch.float32)
    floats = [k for k in exact if exact[k].is_floating_point()]
    rounding = max(float((rounded[k].double() - exact[k]).abs().max()) for k in floats)
    expected = {k: v.float() if v.is_floating_point() else v for k, v in exact.items()}
    assert_same_weights(tuned.model.state_dict(), expected, atol=max(10 * rounding, 1e-6))
    params = dict(create_model("cifar_resnet18", num_classes=4, width=0.125).named_parameters())
    # the checkpoint's momentum, had it been kept, would have moved the weights much further than atol
    buffers = state["optimizer"]["state"]
    stale = max(
        float((config.lr * config.momentum * buffers[i]["momentum_buffer"]).abs().max())
        for i, _ in enumerate(params)
        if i in buffers
    )
    assert stale > 1e-3
    # a fresh run: the step count, schedule and history start at 0 (the checkpoint had done 4 steps)
    after = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert after["step"] == 1 and [h["epoch"] for h in after["history"]] == [1] and after["history"][0]["step"] == 1
    assert after["scheduler"]["last_epoch"] == 1 and state["step"] == 4


def test_init_sha256_is_recorded_and_resume_does_not_reread_init(folder, base, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copyfile(base, copy)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    fit(tiny(folder, tmp_path / "ft", init=str(copy), epochs=1, cos_samples=0))
    cfg = load_checkpoint(tmp_path / "ft" / "last.pt")["config"]
    assert cfg["init"] == str(copy) and cfg["init_sha256"] == digest
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["provenance"]["config"]["init_sha256"] == digest
    assert f"init = {json.dumps(str(copy))}" in (tmp_path / "ft" / "config.toml").read_text()
    # the weights now live in the run's own checkpoints: resuming needs no init file
    copy.unlink()
    assert main(["train", "--resume", str(tmp_path / "ft"), "--epochs", "2", "--quiet"]) == 0
    after = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert after["epoch"] == 2 and after["config"]["init_sha256"] == digest


def test_resume_or_reuse_refuses_an_init_file_that_changed(folder, base, tmp_path, capsys):
    """The init file is there but is no longer the one the run started from (its baseline retrained or
    replaced): resuming, or reusing the finished run, would claim a start it did not have. Clear error, by the
    library, by --resume and by reproduce-style reuse alike; the same file again resumes."""
    copy = tmp_path / "copy.pt"
    shutil.copyfile(base, copy)
    config = tiny(folder, tmp_path / "ft", init=str(copy), epochs=1, cos_samples=0)
    fit(config)
    state = load_checkpoint(copy)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(copy, state)  # "retrained": other weights at the same path
    with pytest.raises(IgradError, match="was fine-tuned from .* but that file is now"):
        fit(config, resume=tmp_path / "ft" / "last.pt")
    rc = main(["train", "--resume", str(tmp_path / "ft"), "--epochs", "2", "--quiet"])
    assert rc == 2 and "but that file is now" in capsys.readouterr().err
    from igrad.train import fit_or_resume

    with pytest.raises(IgradError, match="but that file is now"):
        fit_or_resume(config)  # the finished run, reused
    shutil.copyfile(base, copy)  # the original file back: the run resumes
    assert fit(config.replace(epochs=2), resume=tmp_path / "ft" / "last.pt").final["epoch"] == 2


def test_init_matches_classes_by_name(folder, base, tmp_path):
    # a checkpoint whose outputs are in another class order: the run's labels follow the checkpoint's order
    state = load_checkpoint(base)
    order = ["dog", "ant", "cat", "bee"]
    state["config"] = {**state["config"], "classes": order}
    save_checkpoint(tmp_path / "shuffled.pt", state)
    config = tiny(folder, tmp_path / "ft", init=str(tmp_path / "shuffled.pt"))
    data = prepare_data(config)
    init = load_init(config, data)
    assert init.data.classes == order
    for split, new in ((data.train, init.data.train), (data.test, init.data.test)):
        assert torch.equal(split.images, new.images)
        assert [order[i] for i in new.labels.tolist()] == [CLASSES[i] for i in split.labels.tolist()]
    assert_same_weights(init.state_dict, state["model"])


# --- fine-tuning: refusals -----------------------------------------------------------------------------


def _refused(args: list[str], out: Path, capsys) -> str:
    rc, err = run_cli([*args, "--out", str(out), "--quiet"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert not out.exists()
    return err


def test_init_of_another_network_is_refused(folder, base, tmp_path, capsys):
    common = ["--preset", "cpu", "--data", str(folder), "--init", str(base), "--threads", "1"]
    err = _refused([*common, "--width", "0.25"], tmp_path / "w", capsys)
    assert "another network" in err and "width 0.125, this run's 0.25" in err
    err = _refused([*common, "--width", "0.125", "--model", "cifar_mobilenet_v2"], tmp_path / "m", capsys)
    assert "model 'cifar_resnet18', this run's 'cifar_mobilenet_v2'" in err
    # a misspelt model is an unknown model, named as such, not "another network"
    err = _refused([*common, "--width", "0.125", "--model", "cifar_mobilenetv2"], tmp_path / "t", capsys)
    assert "unknown model 'cifar_mobilenetv2'" in err and "cifar_mobilenet_v2" in err
    assert "another network" not in err


def test_init_with_another_class_count_or_class_names_is_refused(folder, base, tmp_path, capsys):
    three = tmp_path / "three"
    shutil.copytree(folder, three)
    for split in ("train", "test"):
        shutil.rmtree(three / split / "dog")
    common = ["--preset", "cpu", "--width", "0.125", "--init", str(base), "--threads", "1"]
    err = _refused([*common, "--data", str(three)], tmp_path / "a", capsys)
    assert "has 4 classes but" in err and "has 3" in err and str(base) in err
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    for split in ("train", "test"):
        (renamed / split / "dog").rename(renamed / split / "dgo")
    err = _refused([*common, "--data", str(renamed)], tmp_path / "b", capsys)
    assert "'dgo'" in err and "did you mean 'dog'" in err and "does not know" in err


def test_init_bad_values_are_refused_before_anything_is_read(folder, base, tmp_path, capsys):
    common = ["--preset", "cpu", "--data", str(folder), "--width", "0.125"]
    err = _refused([*common, "--init", str(tmp_path / "nope.pt")], tmp_path / "a", capsys)
    assert "nope.pt does not exist" in err
    # torchvision's pretrained weights are --weights, not --init (no download is attempted by either refusal)
    err = _refused([*common, "--model", "tv:resnet18", "--init", "tv"], tmp_path / "b", capsys)
    assert "not a checkpoint path" in err and "--weights DEFAULT" in err
    err = _refused(
        [*common, "--model", "tv:resnet18", "--init", str(base), "--weights", "DEFAULT"], tmp_path / "c", capsys
    )
    assert "both set the starting weights" in err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    err = _refused([*common, "--init", str(tmp_path / "other.pt")], tmp_path / "d", capsys)
    assert "other.pt is not an igrad checkpoint" in err


def test_load_init_refuses_a_config_without_init(folder):
    config = TrainConfig(data=str(folder))
    with pytest.raises(IgradError, match="init"):
        load_init(config, prepare_data(config))


def test_init_that_is_not_a_checkpoint_file_is_refused_clearly(folder, tmp_path, capsys):
    # a text file (the run's config.toml) and a run folder: named for what they are, no torch advice to
    # load with weights_only=False, no traceback
    text = tmp_path / "config.toml"
    text.write_text('model = "cifar_resnet18"\n')
    for given, expected in ((text, "not a checkpoint at all"), (tmp_path, "is a folder; give a checkpoint file")):
        rc = main(["train", "--data", str(folder), "--init", str(given), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "weights_only set to False" not in err and "Traceback" not in err
