"""The README's end-to-end Python example runs as written (paths replaced), and its numbers are the metrics'
definitions (docs/method.md §Metrics) computed by hand from the model's own forwards."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import igrad
from igrad.checkpoint import save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "A model trained here (`igrad train`, `make demo`)"
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.25]


def _example() -> str:
    text = README.read_text()
    start = text.index("```python\n", text.index(MARKER)) + len("```python\n")
    return text[start : text.index("```\n", start)]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """An image folder (3 classes, 5 test images each, 32×32) and a checkpoint of a small ResNet on it."""
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("apple", "bee", "cat"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(5):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.png")
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=3, width=0.125)
    with torch.no_grad():  # running statistics other than (0, 1), so that eval mode is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    config = {"model": "cifar_resnet18", "model_kwargs": {"width": 0.125}, "num_classes": 3}
    config |= {"classes": ["apple", "bee", "cat"], "mean": MEAN, "std": STD}
    ckpt = tmp_path / "run" / "last.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": config})
    return tmp_path / "data", ckpt, model.eval()


def test_readme_end_to_end_example_runs_and_its_numbers_follow_spec4(trained):
    data, ckpt, model = trained
    code = _example()
    code = re.sub(r'igrad\.load_model\("[^"]+"\)', f"igrad.load_model({str(ckpt)!r})", code)
    code = code.replace('"/path/to/cifar100"', repr(str(data)))
    out = io.StringIO()
    scope: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README example", "exec"), scope)
    printed = eval(out.getvalue().strip())  # the example prints a dict of means
    assert set(printed) == {"ad", "ag", "ai", "ins", "del"}

    # by hand: the same 15 images (the seeded pick of all of them), p and o from plain forwards, the formulas of
    # docs/method.md §Metrics
    pick = scope["pick"]
    assert isinstance(pick, torch.Tensor) and sorted(pick.tolist()) == list(range(15))
    raw = torch.stack([
        torch.from_numpy(np.array(Image.open(data / "test" / c / f"{i}.png"))).permute(2, 0, 1)
        for c in ("apple", "bee", "cat") for i in range(5)
    ])[pick].double() / 255  # fmt: skip
    y = torch.tensor([k // 5 for k in range(15)])[pick]
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (MEAN, STD))
    maps = scope["maps"]
    assert isinstance(maps, torch.Tensor) and maps.shape == (15, 32, 32)
    m64 = model.double()
    with torch.no_grad():
        p = m64((raw - mean) / std).softmax(1).gather(1, y[:, None])[:, 0]
        o = m64((raw * maps.double()[:, None] - mean) / std).softmax(1).gather(1, y[:, None])[:, 0]
    ad = (100 * (p - o).clamp(min=0) / p).mean()
    ag = (100 * (o - p).clamp(min=0) / (1 - p)).mean()
    # float32 forwards (the example) against float64 ones: probabilities differ by ~1e-6 relative
    assert printed["ad"] == pytest.approx(float(ad), rel=1e-4, abs=1e-4)
    assert printed["ag"] == pytest.approx(float(ag), rel=1e-4, abs=1e-4)
    # AI counts images with o > p (the float32 mean of 0/100 values); an image whose o and p are within float32
    # noise of each other may count either way, so it bounds the count from both sides
    tied = (o - p).abs() < 1e-5
    low, high = 100 * ((o > p) & ~tied).double().mean(), 100 * ((o > p) | tied).double().mean()
    assert float(low) - 1e-4 <= printed["ai"] <= float(high) + 1e-4
    assert 0 <= printed["del"] <= 100 and 0 <= printed["ins"] <= 100
