"""Training under ``torchrun --nproc_per_node=2`` (gloo on the CPU), with the regulariser on (λ > 0).

One torchrun launch runs two trainings in each of the two processes:

* a 1/8-width CIFAR ResNet-18 (BatchNorm: the regulariser's second, running-statistics forward goes
  through the unwrapped module): both ranks must end with identical weights and buffers, and only
  one set of run files may exist;
* a small CNN without BatchNorm, where splitting each global batch over two ranks and averaging the
  gradients is exactly full-batch training: its weights must match a single-process run of the same
  config (up to float summation order), which checks the per-rank data sharding.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from igrad.checkpoint import load_checkpoint
from igrad.train import fit
from test_train import REPO, cli_args, tiny, write_folder

pytestmark = pytest.mark.slow  # torchrun: two processes per test

TINY_CNN = """
import torch
from torch import nn
from igrad.models import MODELS, register_model


class TinyCNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, num_classes)
        self.igrad_target_layer = "features"

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


if "test_tiny_cnn" not in MODELS:
    register_model("test_tiny_cnn")(lambda num_classes=10: TinyCNN(num_classes))
"""

SCRIPT = """
import gc, json, sys
from pathlib import Path
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import tinynet  # registers test_tiny_cnn
from igrad.train import TrainConfig, fit

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
for name in ("resnet", "tiny"):
    config = TrainConfig.from_dict(json.loads((out / f"{name}.json").read_text()))
    result = fit(config, quiet=True)
    # DistributedDataParallel wrappers still alive (uncollected) once fit has returned
    ddp = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    (out / f"{name}-rank{rank}-ddp-alive.txt").write_text(str(ddp))
    torch.save(result.model.state_dict(), out / f"{name}-rank{rank}.pt")
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(result.history))
dist.barrier()  # no process tears its gloo connections down while the other still writes (abort at exit)
dist.destroy_process_group()
"""


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` with this checkout's igrad, one OpenMP thread per rank;
    asserts that it exited 0 (showing the ranks' output otherwise)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "igrad-cache"))


def test_torchrun_two_ranks_identical_weights_one_set_of_files(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data")
    (tmp_path / "tinynet.py").write_text(TINY_CNN)
    (tmp_path / "script.py").write_text(SCRIPT)
    resnet = tiny(folder, tmp_path / "run-resnet", lam=0.5, epochs=2)
    tinycnn = tiny(folder, tmp_path / "run-tiny", model="test_tiny_cnn", width=None, lam=0.5, epochs=2)
    for name, c in (("resnet", resnet), ("tiny", tinycnn)):
        (tmp_path / f"{name}.json").write_text(json.dumps(c.to_dict()))
    proc = torchrun(str(tmp_path / "script.py"), str(tmp_path))
    # the epoch lines are printed once (rank 0 only)
    assert proc.stdout.count("epoch 2/2") == 2, proc.stdout
    # fit freed its DistributedDataParallel wrapper (whose reducer holds the process group) before returning,
    # not at some later garbage collection, possibly during interpreter shutdown after the group is gone
    for name in ("resnet", "tiny"):
        for rank in (0, 1):
            assert (tmp_path / f"{name}-rank{rank}-ddp-alive.txt").read_text() == "0", (name, rank)

    # BatchNorm network: identical parameters and buffers on both ranks, one set of files
    r0 = torch.load(tmp_path / "resnet-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "resnet-rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert sorted(p.name for p in (tmp_path / "run-resnet").iterdir()) == [
        "best.pt",
        "config.toml",
        "last.pt",
        "metrics.jsonl",
        "run.json",
    ]
    assert len((tmp_path / "run-resnet" / "metrics.jsonl").read_text().splitlines()) == 2
    state = load_checkpoint(tmp_path / "run-resnet" / "last.pt")
    assert state["config"]["world_size"] == 2
    for k in r0:
        assert torch.equal(state["model"][k], r0[k]), k
    h0 = json.loads((tmp_path / "resnet-rank0.json").read_text())
    assert all(r["l_r"] > 0 for r in h0)  # the regulariser ran under DDP

    # BatchNorm-free network: two ranks == one process on the whole batch
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("tinynet")  # registers test_tiny_cnn here too
    single = fit(tinycnn.replace(out=str(tmp_path / "single")), quiet=True)
    t0 = torch.load(tmp_path / "tiny-rank0.pt", weights_only=True)
    t1 = torch.load(tmp_path / "tiny-rank1.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        assert torch.equal(t0[k], t1[k]), k
        torch.testing.assert_close(t0[k], v, atol=1e-5, rtol=1e-4, msg=k)
    ddp_hist = json.loads((tmp_path / "tiny-rank0.json").read_text())
    for a, b in zip(ddp_hist, single.history, strict=True):
        assert a["samples"] == b["samples"] == 48  # each training image once per epoch, over both ranks
        assert a["test_acc"] == b["test_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["l_r"] == pytest.approx(b["l_r"], rel=1e-5)
        assert a["cos"] == pytest.approx(b["cos"], abs=1e-4)


def test_igrad_train_under_torchrun_owns_and_closes_its_group(tmp_path):
    """``igrad train`` under torchrun creates the process group itself (nobody else did) and must close it:
    both ranks exit 0 (no abort at exit), rank 0 alone writes the run folder and prints the epoch lines,
    and the checkpoint records two processes."""
    folder = write_folder(tmp_path / "data")
    config = tiny(folder, tmp_path / "run", lam=0.5, epochs=2)
    proc = torchrun("-m", "igrad", "train", *cli_args(config), cwd=tmp_path)
    assert "terminate called" not in proc.stderr
    assert proc.stdout.count("epoch 2/2") == 1, proc.stdout
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "config.toml",
        "last.pt",
        "metrics.jsonl",
        "run.json",
    ]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["world_size"] == 2
