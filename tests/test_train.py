"""Training: run folder, resume after SIGKILL, determinism, bad input, real-data smoke run.

Every run here is tiny: 4 classes of 12x12 PNG images written to tmp_path, CIFAR ResNet-18 at 1/8
width, one torch thread (the machine's 2 cores are shared; several threads then mostly wait).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import igrad
from igrad.checkpoint import load_checkpoint, load_model, save_checkpoint
from igrad.cli import main
from igrad.provenance import git_commit, machine_info
from igrad.train import METRIC_KEYS, TrainConfig, fit, fit_or_resume, lr_factor
from references import CLASSES, kill_when_stalled, write_folder

REPO = Path(__file__).resolve().parents[1]
_USER_CACHE = os.environ.get("IGRAD_CACHE")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "igrad-cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data"))


def tiny(folder: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        preset="cpu",
        data=str(folder),
        width=0.125,
        epochs=2,
        batch_size=12,
        lam=0.1,
        cos_samples=8,
        threads=1,
        out=str(out),
        amp=False,  # float32 and the whole-batch regulariser unless a test asks (the cpu preset's are bf16, ρ=0.25)
        channels_last=False,
        reg_fraction=1.0,
    )
    return TrainConfig.preset_config("cpu", **{**values, **kw})


def cli_args(config: TrainConfig) -> list[str]:
    args = []
    for k, v in config.to_dict().items():
        if v is None or v == []:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return args


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0 or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# --- pieces --------------------------------------------------------------------------------------------


def test_augment_is_per_sample_torchvision_crop_flip_rotate():
    from torchvision.transforms.v2 import functional as TF

    from igrad.train.augment import _rotate, augment

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 10, 14), dtype=torch.uint8, generator=g)
    # crop + flip only: each output must be torchvision's crop of the zero-padded image at some offset,
    # flipped or not; and the offsets must differ between samples (per-sample parameters).
    out = augment(x, padding=2, flip=True, rotation=0, generator=g).mul(255).round().to(torch.uint8)
    found = []
    for i in range(len(x)):
        padded = TF.pad(x[i], [2])
        hits = [
            (t, l, f)
            for t in range(5)
            for l in range(5)
            for f in (False, True)
            if torch.equal(out[i], (TF.horizontal_flip if f else (lambda z: z))(TF.crop(padded, t, l, 10, 14)))
        ]
        assert hits, f"sample {i} is no crop/flip of its image"
        found.append(hits[0])
    assert len(set(found)) > 4 and {f for *_, f in found} == {False, True}
    # rotation: equal to torchvision's rotate (nearest, zero fill) with each sample's own angle
    angles = torch.tensor([-15.0, -7.3, 0.0, 4.2, 11.9, 15.0] * 2 + [1.0, 2.0, 3.0, -3.0], dtype=torch.float64)
    mine = _rotate(x.float(), angles)
    ref = torch.stack([TF.rotate(x[i], float(angles[i])) for i in range(len(x))]).float()
    assert torch.equal(mine, ref)


def test_lr_schedule_hand_computed():
    c = TrainConfig(epochs=4, milestones=[2, 3], gamma=0.1, warmup_epochs=1)
    f = [lr_factor(s, c, 10) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == 1
    assert f[19] == 1 and f[20] == pytest.approx(0.1) and f[30] == pytest.approx(0.01) and f[39] == pytest.approx(0.01)
    c = TrainConfig(epochs=3, schedule="cosine", warmup_epochs=1)
    f = [lr_factor(s, c, 10) for s in range(30)]
    assert f[9] == 1 and f[10] == 1
    assert f[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert f[29] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_config_toml_roundtrip_and_checks(tmp_path):
    from igrad.train import config_from_toml, config_to_toml

    c = TrainConfig.preset_config("cpu", lam=0.75, allow=["silu"], milestones=[3, 5], mean=[0.5] * 3, std=[0.25] * 3)
    assert c.epochs == 24 and c.schedule == "cosine" and c.width == 0.5 and c.lr == 0.1 and c.momentum == 0.9
    (tmp_path / "c.toml").write_text(config_to_toml(c, "a comment"))
    assert TrainConfig.from_dict(config_from_toml(tmp_path / "c.toml")) == c
    with pytest.raises(igrad.IgradError, match="unknown config field 'lamda'.*'lam'"):
        TrainConfig.from_dict({"lamda": 1})
    with pytest.raises(igrad.IgradError, match="'epochs' must be int"):
        TrainConfig.from_dict({"epochs": 1.5})
    (tmp_path / "bad.toml").write_text("lam = [")
    with pytest.raises(igrad.IgradError, match="not valid TOML"):
        config_from_toml(tmp_path / "bad.toml")


def test_val_split_is_stratified_seeded_and_disjoint(folder):
    from igrad.train import prepare_data

    a = prepare_data(TrainConfig(data=str(folder), val_fraction=0.25, split_seed=3))
    b = prepare_data(TrainConfig(data=str(folder), val_fraction=0.25, split_seed=3, seed=9))
    assert torch.bincount(a.val.labels).tolist() == [3, 3, 3, 3]
    assert torch.bincount(a.train.labels).tolist() == [9, 9, 9, 9]
    assert torch.equal(a.val.images, b.val.images)  # independent of the training seed
    flat = {bytes(im.numpy()) for im in a.train.images}
    assert not flat & {bytes(im.numpy()) for im in a.val.images}


# --- a run ---------------------------------------------------------------------------------------------


def reference_accuracy(model, folder: Path, mean, std) -> float:
    """Accuracy from the PNG files themselves, normalised by hand."""
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for f in sorted((folder / "test" / name).iterdir()):
            images.append(np.array(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
            labels.append(c)
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std
    ).view(3, 1, 1)
    with torch.no_grad():
        return float((model(x).argmax(1) == torch.tensor(labels)).float().mean())


def test_run_folder_metrics_checkpoint_and_determinism(folder, tmp_path, capsys):
    r1 = fit(tiny(folder, tmp_path / "a"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["best.pt", "config.toml", "last.pt", "metrics.jsonl", "run.json"]
    lines = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines == r1.history
    for r in lines:
        assert set(r) == set(METRIC_KEYS) - {"val_acc", "val_cos"}
        assert r["loss"] == pytest.approx(r["l_c"] + 0.1 * r["l_r"], rel=1e-6)  # L = L_C + λ L_R
        assert 0 <= r["test_acc"] <= 1 and -1 <= r["cos"] <= 1 and r["lr"] > 0 and r["time"] > 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "L_R" in out

    model, cfg = load_model(tmp_path / "a" / "last.pt")
    for key in ("model", "model_kwargs", "num_classes", "data", "mean", "std", "lam", "error", "stats", "seed"):
        assert key in cfg, key
    assert cfg["num_classes"] == 4 and cfg["model_kwargs"] == {"width": 0.125} and cfg["lam"] == 0.1
    assert cfg["classes"] == CLASSES and cfg["stats"] == igrad.DEFAULT_STATS
    assert_same_weights(model.state_dict(), r1.model.state_dict())
    assert lines[-1]["test_acc"] == pytest.approx(reference_accuracy(model, folder, cfg["mean"], cfg["std"]))
    state = load_checkpoint(tmp_path / "a" / "last.pt")
    assert {"optimizer", "scheduler", "rng", "epoch", "provenance"} <= state.keys() and state["epoch"] == 2
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["status"] == "finished" and run["provenance"]["versions"]["torch"] == torch.__version__

    # same config, another folder: identical logs (times aside) and weights
    r2 = fit(tiny(folder, tmp_path / "b"))

    def strip(h):
        return [{k: v for k, v in r.items() if k not in ("time", "train_time", "elapsed")} for r in h]

    assert strip(r1.history) == strip(r2.history)
    assert_same_weights(r1.model.state_dict(), r2.model.state_dict())
    # a different seed trains differently
    r3 = fit(tiny(folder, tmp_path / "c", seed=1, epochs=1))
    assert strip(r3.history)[0] != strip(r1.history)[0]


def test_cli_precedence_preset_then_config_file_then_flags(folder, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(
        f'preset = "cpu"\ndata = "{folder}"\nlam = 0.0\nseed = 5\nepochs = 1\nwidth = 0.125\nthreads = 1\n'
    )
    rc = main(["train", "--config", str(tmp_path / "c.toml"), "--seed", "3", "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 0
    cfg = load_checkpoint(tmp_path / "r" / "last.pt")["config"]
    assert (cfg["preset"], cfg["schedule"], cfg["lam"], cfg["seed"], cfg["epochs"]) == ("cpu", "cosine", 0.0, 3, 1)
    assert "done: 1 epochs" in capsys.readouterr().out
    # the saved config.toml reruns the same training
    from igrad.train import config_from_toml

    again = TrainConfig.from_dict({**config_from_toml(tmp_path / "r" / "config.toml"), "out": str(tmp_path / "r2")})
    assert again.seed == 3 and again.lam == 0.0
    assert_same_weights(fit(again).model.state_dict(), load_checkpoint(tmp_path / "r" / "last.pt")["model"])


def test_lam_zero_never_computes_the_regulariser(folder, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("regulariser computed with lam = 0")

    monkeypatch.setattr(igrad.GradientAlignmentLoss, "forward", boom)
    r = fit(tiny(folder, tmp_path / "r", lam=0.0, epochs=1))
    assert r.history[0]["l_r"] is None and r.history[0]["loss"] == r.history[0]["l_c"]


# --- resume after SIGKILL --------------------------------------------------------------------------------


# A training process that stalls after optimiser step STEP (fit's step callback), announcing it in MARKER,
# until it is killed: argv = config as JSON, STEP, MARKER.
STALL = """
import json, os, sys, time
from pathlib import Path
from igrad.train import TrainConfig, fit

config, step, marker = TrainConfig.from_dict(json.loads(sys.argv[1])), int(sys.argv[2]), Path(sys.argv[3])

def stall(info):
    if info.global_step == step:
        marker.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

fit(config, quiet=True, callbacks=[stall])
"""


FAST = {"reg_fraction": 0.5, "amp": True, "channels_last": True}  # the sub-batch regulariser in bf16 + NHWC


@pytest.mark.parametrize(
    "every,extra",
    [(0, {}), (3, {}), (3, FAST), (3, {"lam_warmup": 3.0})],
    ids=["epoch-checkpoint", "mid-epoch-checkpoint", "fraction-bf16-cl", "mid-lam-warmup"],
)
@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_gives_uninterrupted_weights(folder, tmp_path, every, extra):
    # 48 images, batch 12: 4 steps per epoch; killed after global step 7 (epoch 2, step 3). With
    # checkpoint_every=3 the last checkpoint is from step 6 (inside epoch 2), else from the end of epoch 1.
    # With reg_fraction < 1 the regulariser's subsets are seeded per step: the resumed run draws the same.
    # With lam_warmup = 3 (12 steps) the whole run is inside the warm-up: λ_eff follows the global step.
    config = tiny(folder, tmp_path / "killed", checkpoint_every=every, **extra)
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL, json.dumps(config.to_dict()), "7", str(marker)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    kill_when_stalled(proc, marker)
    state = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == ((1, 2, 6) if every else (1, 0, 4))
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]  # no temp file left

    assert main(["train", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0
    uninterrupted = fit(tiny(folder, tmp_path / "straight", checkpoint_every=every, **extra))
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert resumed["epoch"] == 2
    assert_same_weights(resumed["model"], uninterrupted.model.state_dict())
    logged = [json.loads(s) for s in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in logged] == [r["test_acc"] for r in uninterrupted.history]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in uninterrupted.history], rel=1e-12)
    assert [r["lam"] for r in logged] == [r["lam"] for r in uninterrupted.history]
    # each process that trained the run is recorded: the killed one from step 0, the resumed one from the
    # checkpoint's step; reusing the finished run trains nothing and adds none
    sessions = json.loads((tmp_path / "killed" / "run.json").read_text())["sessions"]
    assert [(x["from_epoch"], x["from_step"]) for x in sessions] == [(0, 0), (state["epoch"], state["step"])]
    # the resumed session ran in this process; the killed one imported igrad in its own (its commit is the
    # tree's when it started, which a developer's commit during the test run may have moved on)
    assert sessions[1]["commit"] == git_commit() and all(x["world_size"] == 1 for x in sessions)
    assert resumed["sessions"] == sessions
    assert fit_or_resume(config, quiet=True).sessions == sessions
    reused = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert reused["sessions"] == sessions and reused["provenance"]["commit"] == sessions[-1]["commit"]


# --- bad input ----------------------------------------------------------------------------------------


def run_cli(args, capsys) -> tuple[int, str]:
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


def test_missing_data_folder(tmp_path, capsys):
    rc, err = run_cli(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "data folder" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_folder_with_no_images(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / "d" / split / "cls").mkdir(parents=True)
        (tmp_path / "d" / split / "cls" / "notes.txt").write_text("no image")
    rc, err = run_cli(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "has no images" in err
    assert not (tmp_path / "run").exists()


def test_unknown_model(folder, tmp_path, capsys):
    rc, err = run_cli(["--data", str(folder), "--model", "cifar_resnet81", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "unknown model 'cifar_resnet81'" in err and "cifar_resnet18" in err
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_refused(folder, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pt").write_bytes(b"x")
    rc, err = run_cli(["--data", str(folder), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "--resume" in err and (tmp_path / "r" / "last.pt").read_bytes() == b"x"


def test_amp_channels_last_and_reg_fraction_on_the_cpu(folder, tmp_path, capsys):
    """bf16 autocast is accepted on the CPU and trains: the losses track the float32 run's to bf16
    precision (8 mantissa bits: ~4e-3 per rounding, a few percent after a few steps), but are not equal
    (autocast really ran); the model's parameters are in channels-last layout; bad fractions are refused."""
    rc, err = run_cli(["--data", str(folder), "--amp", "--device", "cpu", "--channels-last", "--reg-fraction", "0.5",
                       "--width", "0.125", "--epochs", "1", "--batch-size", "12", "--cos-samples", "4",
                       "--out", str(tmp_path / "bf16"), "--quiet"], capsys)  # fmt: skip
    assert rc == 0, err
    fp32 = fit(tiny(folder, tmp_path / "fp32", epochs=1, lam=0.1))
    bf16 = fit(tiny(folder, tmp_path / "bf16b", epochs=1, lam=0.1, amp=True, channels_last=True))
    a, b = fp32.history[0]["loss"], bf16.history[0]["loss"]
    assert a != b and b == pytest.approx(a, rel=0.05)
    conv = bf16.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for bad in ("0", "1.5"):
        rc, err = run_cli(["--data", str(folder), "--reg-fraction", bad, "--out", str(tmp_path / "x")], capsys)
        assert rc == 2 and "reg_fraction must be in (0, 1]" in err
    args = ["--data", str(folder), "--reg-fraction", "0.5", "--stats", "coupled", "--out", str(tmp_path / "x")]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "coupled" in err


@pytest.fixture(scope="module")
def finished_run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    fit(tiny(folder, out, epochs=1, lam=0.0, cos_samples=0))
    return out


def test_truncated_checkpoint_for_resume(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = (finished_run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    rc, err = run_cli(["--resume", str(run)], capsys)
    assert rc == 2 and "truncated or corrupt" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]
    assert (run / "last.pt").read_bytes() == data[: len(data) // 2]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused(finished_run, tmp_path, capsys):
    state = load_checkpoint(finished_run / "last.pt")
    marker = tmp_path / "code-ran"
    state["evil"] = _Evil(marker)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "last.pt")
    rc, err = run_cli(["--resume", str(run), "--epochs", "2"], capsys)
    assert rc == 2 and "weights_only" in err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_results_name_the_commit_of_the_code_the_process_loaded(folder, tmp_path, monkeypatch):
    """The commit in a run's files is the one the process read first (the code that ran), not the tree's
    at write time; a checkpoint from before sessions were recorded gives its provenance's commit as the
    first session when resumed."""
    monkeypatch.setattr(igrad.provenance, "_process_commit", "feedbeef+loaded")
    out = tmp_path / "run"
    result = fit(tiny(folder, out, epochs=1, cos_samples=0))
    run = json.loads((out / "run.json").read_text())
    assert run["provenance"]["commit"] == "feedbeef+loaded" == load_checkpoint(out / "last.pt")["provenance"]["commit"]
    assert [x["commit"] for x in result.sessions] == ["feedbeef+loaded"] and run["sessions"] == result.sessions
    # the tree igrad was imported from differs from the one now: both are recorded
    now = igrad.provenance._own_commit()
    assert run["provenance"]["commit_at_write"] == now != "feedbeef+loaded"
    monkeypatch.setattr(igrad.provenance, "_process_commit", now)
    assert "commit_at_write" not in igrad.provenance.provenance()
    # reused, finished, by a process of another commit: the files still name the code that trained it
    monkeypatch.setattr(igrad.provenance, "_process_commit", "0ther")
    assert fit_or_resume(tiny(folder, out, epochs=1, cos_samples=0), quiet=True).sessions == result.sessions
    assert json.loads((out / "run.json").read_text())["provenance"]["commit"] == "feedbeef+loaded"

    old = load_checkpoint(out / "last.pt")
    del old["sessions"]
    save_checkpoint(out / "last.pt", old)
    monkeypatch.setattr(igrad.provenance, "_process_commit", "cafe0000")
    resumed = fit(tiny(folder, out, epochs=2, cos_samples=0), resume=out)
    first, second = resumed.sessions
    assert first["commit"] == "feedbeef+loaded" and first["from_step"] is None and first["until_step"] == 4
    assert set(first) >= set(second)  # the same fields, unknown ones None
    assert (second["commit"], second["from_epoch"], second["from_step"]) == ("cafe0000", 1, 4)


def test_git_commit_of_a_checkout_reads_it_now(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,  # the developer's settings (signing, hooks) stay out of it
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def run(*args: str) -> str:
        return subprocess.run([git, *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    run("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    run("add", "f.txt")
    run("commit", "-q", "-m", "one")
    head = run("rev-parse", "HEAD").strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == head + "+dirty"


def test_machine_info_names_the_cpu_and_its_bf16_units():
    """Results name the CPU (``model name`` of /proc/cpuinfo, read here independently) and whether it has bf16
    units (torch's own CPU feature checks), so a report can say which machine made each part of it."""
    info = machine_info()
    units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert info["cpu_bf16_units"] is bool(units) and info["cpus"] == os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo")
    names = [] if not cpuinfo.is_file() else re.findall(r"^model name\s*:\s*(.+?)\s*$", cpuinfo.read_text(), re.M)
    if names:
        assert info["cpu_model"] == names[0]
    else:
        assert info["cpu_model"] == (platform.processor() or None)


def test_resume_refuses_changed_training_fields(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((finished_run / "last.pt").read_bytes())
    rc, err = run_cli(["--resume", str(run), "--lr", "0.5"], capsys)
    assert rc == 2 and f"cannot resume the run in {run}: lr is 0.5" in err and f"delete {run}" in err


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(folder, tmp_path, capsys):
    # epoch 1 at lr 0.1; from epoch 2 the rate is multiplied by 1e30 and the weights blow up
    config = tiny(folder, tmp_path / "nan", schedule="multistep", milestones=[1], gamma=1e30, cos_samples=0)
    rc, err = run_cli(cli_args(config), capsys)
    assert rc == 2
    assert "non-finite loss at epoch 2, step" in err and "last good checkpoint" in err
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "nan" / "run.json").read_text())["status"].startswith("stopped: non-finite loss")
    # the kept checkpoint is the one of epoch 1: rerunning one epoch gives the same weights
    fit(tiny(folder, tmp_path / "one", epochs=1, schedule="multistep", milestones=[1], gamma=1e30, cos_samples=0))
    assert_same_weights(state["model"], load_checkpoint(tmp_path / "one" / "last.pt")["model"])


def test_save_checkpoint_roundtrip_is_weights_only(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}, "config": {"a": 1}})
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.ones(2))


# --- real data ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar100_smoke_run_beats_chance(tmp_path, monkeypatch):
    from igrad.data import data_root_from_env

    root = data_root_from_env()
    if root is None:
        pytest.skip("IGRAD_DATA is not set (or missing): no real CIFAR-100 here")
    if _USER_CACHE is None:  # the decoded real data is cached where the user keeps it, not in tmp
        monkeypatch.delenv("IGRAD_CACHE")
    else:
        monkeypatch.setenv("IGRAD_CACHE", _USER_CACHE)
    # all 100 classes, 1/8-width ResNet-18, 250 steps of 64 images (a third of an epoch)
    config = TrainConfig.preset_config(
        "cpu",
        data=str(root),
        width=0.125,
        epochs=1,
        steps_per_epoch=250,
        batch_size=64,
        warmup_epochs=0.1,
        lam=0.0,
        cos_samples=0,
        threads=1,
        eval_batch_size=1000,
        out=str(tmp_path / "real"),
    )
    result = fit(config, quiet=True)
    assert len(result.model.fc.weight) == 100
    assert result.test_acc > 0.03, result.history  # chance is 0.01
    x = torch.zeros(1, 3, 32, 32)
    assert F.softmax(result.model(x), 1).shape == (1, 100)


# --- step callbacks, normalisation, checkpoint fields ------------------------------------------------


def test_step_callbacks_see_every_optimiser_step_in_order(folder, tmp_path):
    seen = []
    config = tiny(folder, tmp_path / "r", epochs=2, lam=0.0, cos_samples=0)
    r = fit(config, quiet=True, callbacks=[seen.append])
    # 48 images, batch 12: 4 steps per epoch
    assert [(i.epoch, i.step, i.global_step) for i in seen] == [(e, s, 4 * e + s) for e in (0, 1) for s in (1, 2, 3, 4)]
    assert all(i.steps_per_epoch == 4 and i.run_dir == r.run_dir and i.lr > 0 for i in seen)
    assert [i.lr for i in seen] == pytest.approx([0.1 * lr_factor(s, config, 4) for s in range(8)], rel=1e-12)
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    assert "scaler" not in state and all(v is not None for v in state.values())


def test_normalization_rule_names_or_computes_never_guesses_from_shape(tmp_path):
    from igrad.data import load_split, normalization_for
    from igrad.normalization import NORMALIZATIONS
    from igrad.train import prepare_data

    # 100 classes of 32x32 images: CIFAR-100's shape, but nothing says it is CIFAR-100
    classes = [f"c{i:03d}" for i in range(100)]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (tmp_path / "d" / split / name).mkdir(parents=True)
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "d" / split / name / "0.png")
    train = load_split(tmp_path / "d", "train")
    x = train.images.double() / 255
    computed = normalization_for(tmp_path / "d", train)
    assert computed.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert computed.std == pytest.approx(x.std((0, 2, 3)).tolist(), abs=1e-6)
    assert normalization_for(tmp_path / "d", train, "cifar100") == NORMALIZATIONS["cifar100"]
    assert normalization_for(tmp_path / "d", train, "data") == computed
    assert normalization_for("cifar10", None, "cifar100") == NORMALIZATIONS["cifar10"]  # the named data set's own
    # the config: the recipe's cifar100 by default, "data" computes, mean/std override both
    assert prepare_data(TrainConfig(data=str(tmp_path / "d"))).normalization == NORMALIZATIONS["cifar100"]
    assert prepare_data(TrainConfig(data=str(tmp_path / "d"), normalization="data")).normalization == computed
    given = TrainConfig(data=str(tmp_path / "d"), mean=[0.5] * 3, std=[0.25] * 3)
    assert prepare_data(given).normalization.mean == (0.5,) * 3
    with pytest.raises(igrad.IgradError, match="unknown normalization 'cifar1000'"):
        TrainConfig(normalization="cifar1000").validate()
    with pytest.raises(igrad.IgradError, match="has 1 channels but the images .* have 3"):
        prepare_data(TrainConfig(data=str(tmp_path / "d"), mean=[0.5], std=[0.25]))


def test_import_starts_no_subprocess_and_the_commit_is_read_when_first_asked():
    """``import igrad`` (and its CLI) runs no subprocess, seen by an audit hook on ``subprocess.Popen`` set after
    torch's own import (which may ask ``ldconfig`` for CUDA libraries); the commit is read with git the first time
    a job asks (:func:`igrad.provenance.process_commit`), then kept."""
    code = (
        "import sys, torch, torchvision\n"
        "seen = []\n"
        "sys.addaudithook(lambda event, args: seen.append(event) if event == 'subprocess.Popen' else None)\n"
        "import igrad, igrad.cli, igrad.reproduce\n"
        "print(len(seen))\n"
        "from igrad.provenance import process_commit\n"
        "first = process_commit(); after_first = len(seen)\n"
        "assert process_commit() == first and len(seen) == after_first\n"
        "print(after_first)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0" and int(out[1]) >= 1  # git ran only when asked, and once
