"""``igrad evaluate``: subset selection, the end-to-end CLI on a tiny checkpoint and image folder, the
numbers it writes (checked against direct calls), the side-by-side comparison, and clear errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import igrad
from igrad.checkpoint import save_checkpoint
from igrad.cli import main
from igrad.data import Split, load_split
from igrad.errors import IgradError
from igrad.evaluate import compare_results, evaluate_model, select_indices
from igrad.metrics import confidence_metrics, deletion, insertion
from igrad.report import compare_table
from igrad.saliency import create_method
from references import kill_when_stalled

MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.25, 0.3]
CONFIG = {
    "model": "cifar_resnet18",
    "model_kwargs": {"width": 0.125},
    "num_classes": 3,
    "classes": ["apple", "bee", "cat"],
    "mean": MEAN,
    "std": STD,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An image folder with train/ and test/: 3 classes, 4 test images each, 8×8 RGB."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("apple", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))


def make_checkpoint(path, seed, data_dir):
    torch.manual_seed(seed)
    model = igrad.create_model("cifar_resnet18", num_classes=3, width=0.125)
    save_checkpoint(path, {"model": model.state_dict(), "config": {**CONFIG, "data": str(data_dir)}})
    return path


def test_select_indices_fixed_seeded_nested():
    a = select_indices(100, 10, seed=3)
    assert torch.equal(a, select_indices(100, 10, seed=3))
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10 and 0 <= int(a.min()) and int(a.max()) < 100
    assert set(a.tolist()) <= set(select_indices(100, 30, seed=3).tolist())  # a smaller limit is a subset
    assert not torch.equal(a, select_indices(100, 10, seed=4))
    assert torch.equal(select_indices(7, None, seed=0), torch.arange(7))
    with pytest.raises(IgradError, match="larger than the data"):
        select_indices(12, 13, seed=0)
    with pytest.raises(IgradError, match="positive"):
        select_indices(12, 0, seed=0)


def test_cli_end_to_end_numbers(tmp_path, data_dir, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt", 0, data_dir)
    out = tmp_path / "eval"
    rc = main(
        ["evaluate", "--checkpoint", str(ckpt), "--limit", "5", "--seed", "1", "--methods", "gradcam,gradient"]
        + ["--batch-size", "3", "--step", "5", "--no-progress", "--out", str(out)]
    )
    assert rc == 0
    assert "| method | AD ↓ | AG ↑ | AI ↑ | Insertion ↑ | Deletion ↓ |" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["n"] == 5 and res["data"]["n_total"] == 12
    assert res["settings"]["methods"] == ["gradcam", "gradient"]
    assert res["settings"]["metrics"] == ["ad", "ag", "ai", "ins", "del"]
    assert res["settings"]["n_steps"] == math.ceil(64 / 5) == 13
    prov = res["provenance"]
    assert prov["seed"] == 1 and prov["config"]["model"] == "cifar_resnet18" and "torch" in prov["versions"]

    # recompute everything directly, outside evaluate: subset, normalisation, ground-truth targets
    model, _ = igrad.checkpoint.load_model(ckpt)
    split = load_split(data_dir, "test")
    idx = select_indices(12, 5, seed=1)
    assert res["data"]["indices"] == idx.tolist()
    norm = lambda u8: (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)  # noqa: E731
    with torch.no_grad():
        correct = sum(int(model(norm(split.images[i : i + 1])).argmax(1).item() == split.labels[i]) for i in range(12))
    assert res["model"]["accuracy"] == pytest.approx(correct / 12)
    x, y = norm(split.images[idx]), split.labels[idx]
    assert res["per_sample"]["target"] == y.tolist()
    cos = igrad.gradient_cosine(model, x, y)
    assert res["model"]["cos"]["mean"] == pytest.approx(cos.mean().item(), abs=1e-6)
    for name in ("gradcam", "gradient"):
        with create_method(name, model) as m:
            maps = m(x, y)
        direct = confidence_metrics(model, x, maps, y, mean=MEAN, std=STD)
        direct["ins"], ins_curves = insertion(model, x, maps, y, step=5)
        direct["del"], del_curves = deletion(model, x, maps, y, step=5)
        for k in ("ad", "ag", "ai", "ins", "del"):
            got = res["per_sample"]["methods"][name][k]
            np.testing.assert_allclose(got, direct[k].numpy(), atol=1e-4, err_msg=f"{name} {k}")
            s = res["results"][name][k]
            assert s["n"] == 5 and s["mean"] == pytest.approx(float(np.mean(got)), abs=1e-6)
            half = 1.959964 * float(np.std(got, ddof=1)) / math.sqrt(5)
            assert s["ci_high"] - s["ci_low"] == pytest.approx(2 * half, abs=1e-6)
        np.testing.assert_allclose(res["curves"][name]["ins"], ins_curves.mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(res["curves"][name]["del"], del_curves.mean(0).numpy(), atol=1e-6)

    rows = list(csv.DictReader(line for line in (out / "results.csv").read_text().splitlines() if line[0] != "#"))
    assert (out / "results.csv").read_text().startswith("# igrad evaluate results; provenance:")
    got = {(r["method"], r["metric"]): float(r["mean"]) for r in rows}
    assert got[("gradient", "del")] == pytest.approx(res["results"]["gradient"]["del"]["mean"])
    assert got[("(model)", "accuracy")] == pytest.approx(res["model"]["accuracy"])
    md = (out / "results.md").read_text()
    assert "| gradcam |" in md and "N = 5 images (seed 1)" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_target_pred_and_subset_only_metrics(tmp_path):
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=3, width=0.125).eval()
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.zeros(6).long(), [])
    res = evaluate_model(
        model, split, mean=MEAN, std=STD, methods="gradient", metrics="ai,del", target="pred", progress=False
    )
    x = (split.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert res["per_sample"]["target"] == model(x).argmax(1).tolist()
    assert list(res["results"]["gradient"]) == ["ai", "del"] and list(res["curves"]["gradient"]) == ["del"]
    with pytest.raises(IgradError, match="unknown target"):
        evaluate_model(model, split, mean=MEAN, std=STD, methods="gradient", target="label", progress=False)


def _fake(values: dict, acc: float, cos: float, per_sample: dict, indices=(0, 1, 2)) -> dict:
    metrics = list(next(iter(values.values())))
    return {
        "data": {"n": len(indices), "indices": list(indices)},
        "settings": {"metrics": metrics, "ci": "normal"},
        "model": {"accuracy": acc, "cos": {"mean": cos}},
        "results": {m: {k: {"mean": v} for k, v in d.items()} for m, d in values.items()},
        "per_sample": {"cos": [cos] * len(indices), "methods": per_sample},
    }


def test_compare_table_marks_the_better_value():
    base_ps = {"gradcam": {"ad": [10.0, 11.0, 9.0], "ag": [3.0, 2.0, 4.0], "ins": [40.0, 41.0, 39.0], "del": [5, 5, 5]}}
    ours_ps = {"gradcam": {"ad": [5.0, 6.0, 4.0], "ag": [1.0, 3.0, 2.0], "ins": [50.0, 52.0, 54.0], "del": [5, 5, 5]}}
    mean = lambda d: {m: {k: float(np.mean(v)) for k, v in mk.items()} for m, mk in d.items()}  # noqa: E731
    base = _fake(mean(base_ps), 0.70, 0.05, base_ps)
    ours = _fake(mean(ours_ps), 0.69, 0.80, ours_ps)
    cmp = compare_results(base, ours)
    g = cmp["methods"]["gradcam"]
    assert g["ad"]["better"] == "regularised"  # lower AD is better
    assert g["ag"]["better"] == "baseline"  # AG: 3 vs 2, higher is better
    assert g["ins"]["better"] == "regularised" and g["del"]["better"] == "tie"
    assert g["ad"]["significant"] and not g["ag"]["significant"]
    assert cmp["model"]["accuracy"]["better"] == "baseline" and cmp["model"]["cos"]["better"] == "regularised"
    table = compare_table(base, ours)
    row = next(line for line in table.splitlines() if line.startswith("| gradcam |"))
    # Holm over the 4 cells, p by hand: AD diffs all -5 (p = 0), Insertion diffs 10, 11, 15 (z = 12 / (√7/√3)
    # = 7.86, p ≈ 4e-15), AG -2, 1, -2 (z = 1, p = 0.317), deletion all 0 (p = 1): 0 ≤ 0.05/4 and 4e-15 ≤
    # 0.05/3 rejected, 0.317 > 0.05/2 stops: AD and Insertion keep their mark (†)
    assert g["ad"]["p"] == 0 and g["ins"]["p"] < 1e-12 and g["ag"]["p"] == pytest.approx(0.3173, abs=1e-4)
    assert g["del"]["p"] == 1 and [g[k]["holm_significant"] for k in ("ad", "ag", "ins", "del")] == [
        True,
        False,
        True,
        False,
    ]
    assert row == "| gradcam | 10.00 | **5.00**\\*† | **3.00** | 2.00 | 40.00 | **52.00**\\*† | 5.00 | 5.00 |"
    assert "| top-1 accuracy (%) | **70.00** | 69.00 |" in table
    assert "the same images" in table
    # different subsets: no paired test, said so
    other = _fake(mean(ours_ps), 0.69, 0.80, ours_ps, indices=(3, 4, 5))
    assert "NOT the same images" in compare_table(base, other)
    assert "significant" not in compare_results(base, other)["methods"]["gradcam"]["ad"]


def test_cli_compare(tmp_path, data_dir):
    base = make_checkpoint(tmp_path / "base.pt", 0, data_dir)
    ours = make_checkpoint(tmp_path / "ours.pt", 1, data_dir)
    out = tmp_path / "cmp"
    rc = main(
        ["evaluate", "--compare", str(base), str(ours), "--limit", "4", "--methods", "gradcam", "--metrics", "ad,del"]
        + ["--no-progress", "--no-accuracy", "--out", str(out)]
    )
    assert rc == 0
    b = json.loads((out / "baseline" / "results.json").read_text())
    o = json.loads((out / "regularised" / "results.json").read_text())
    assert b["data"]["indices"] == o["data"]["indices"]
    row = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| gradcam |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    for j, k in enumerate(("ad", "del")):  # lower is better for both
        vb, vo = b["results"]["gradcam"][k]["mean"], o["results"]["gradcam"][k]["mean"]
        winner = 0 if vb < vo else 1
        assert cells[2 * j + winner].startswith("**") and not cells[2 * j + 1 - winner].startswith("**")
    assert json.loads((out / "compare.json").read_text())["comparison"]["paired"] is True


def test_cli_errors(tmp_path, data_dir, capsys):
    ckpt = make_checkpoint(tmp_path / "best.pt", 0, data_dir)
    base = ["evaluate", "--checkpoint", str(ckpt), "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*base, "--limit", "13"]) == 2
    assert "limit 13 is larger than the data (12 images)" in capsys.readouterr().err
    assert main([*base, "--metrics", "ad,insertion"]) == 2
    assert "unknown metric 'insertion'" in capsys.readouterr().err
    assert main([*base, "--metrics", "AD,deletion,insertion"]) == 2  # every wrong name at once; case folded
    assert "2 unknown metric names: 'deletion' (did you mean 'del'?); 'insertion'" in capsys.readouterr().err
    assert main([*base, "--methods", "gradcam,gradcamm"]) == 2
    assert "unknown saliency method 'gradcamm'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


# --- resumable evaluation ------------------------------------------------------------------------------


def _numbers(res: dict) -> dict:
    """Everything an evaluation measured: all but the wall times and the provenance's clock."""
    return {k: v for k, v in res.items() if k not in ("timing", "provenance")}


@pytest.mark.slow
def test_sigkill_mid_evaluation_then_resume_gives_uninterrupted_results(tmp_path, data_dir):
    # 12 test images in chunks of 3: killed once chunk 1 (the second) is stored; SmoothGrad's noise is
    # seeded per image, so a resumed chunk must give the same maps as in one go
    ckpt = make_checkpoint(tmp_path / "best.pt", 0, data_dir)
    args = ["evaluate", "--checkpoint", str(ckpt), "--methods", "gradcam,gradient,smoothgrad"]
    args += ["--batch-size", "3", "--step", "5", "--no-progress"]
    killed, marker = tmp_path / "killed", tmp_path / "stalled"
    threads = str(torch.get_num_threads())  # the same float kernels as the runs in this process
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    env["PYTHONPATH"] = str(Path(igrad.__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    # the CLI in a real process, with evaluate's public chunk callback stalling it once chunk 1 is stored
    script = (
        "import functools, os, pathlib, sys, time\n"
        "import igrad.evaluate as ev\n"
        "from igrad.cli import main\n"
        "def stall(chunk):\n"
        "    if chunk == 1:\n"
        f"        pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\n"
        "        while True: time.sleep(0.05)\n"
        "ev.evaluate_checkpoint = functools.partial(ev.evaluate_checkpoint, callbacks=[stall])\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args, "--out", str(killed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    kill_when_stalled(proc, marker)
    assert not (killed / "results.json").exists()
    stored = sorted(p.name for p in (killed / ".partial").glob("*/*"))
    assert stored == ["accuracy.pt", "chunk-00000.pt", "chunk-00001.pt"]

    # other arguments never pick up these chunks (and leave them alone)
    assert main([*args, "--seed", "1", "--out", str(killed)]) == 0
    assert json.loads((killed / "results.json").read_text())["timing"]["resumed_parts"] == 0
    assert sorted(p.name for p in (killed / ".partial").glob("*/*")) == stored

    assert main([*args, "--out", str(killed)]) == 0  # the same arguments: continues
    resumed = json.loads((killed / "results.json").read_text())
    assert resumed["timing"]["resumed_parts"] == 3  # the accuracy and two chunks were not recomputed
    assert not (killed / ".partial").exists()  # removed once complete (the folder too, once empty)
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert straight["timing"]["resumed_parts"] == 0
    assert _numbers(resumed) == _numbers(straight)  # exactly: JSON numbers are the float64 values


def test_eval_config_is_checked_and_every_field_is_a_flag():
    from igrad.cli import build_parser
    from igrad.evaluate import EvalConfig

    cfg = EvalConfig(methods="gradcam, gradient", metrics="all", limit=5)
    assert cfg.methods == ("gradcam", "gradient") and cfg.metrics == ("ad", "ag", "ai", "ins", "del")
    assert EvalConfig.from_dict(cfg.to_dict()) == cfg and cfg.replace(seed=3).seed == 3
    for bad, match in (
        ({"target": "label"}, "unknown target"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"deletion_substrate": "black"}, "unknown substrate"),
        ({"score": "logprob"}, "unknown score"),
        ({"ci": "exact"}, "unknown confidence interval"),
        ({"methods": "gradcan"}, "unknown saliency method"),
        ({"lmit": 3}, "unknown evaluation setting"),
    ):
        with pytest.raises(IgradError, match=match):
            EvalConfig.from_dict(bad)
    help_text = build_parser().parse_args(["evaluate", "--checkpoint", "c.pt", "--out", "o"])
    for f in dataclasses.fields(EvalConfig):
        assert getattr(help_text, f.name) == f.default, f.name  # each field is a flag with the field's default
    args = build_parser().parse_args(
        ["evaluate", "--checkpoint", "c.pt", "--out", "o", "--deletion-substrate", "mean", "--no-accuracy"]
    )
    assert args.deletion_substrate == "mean" and args.accuracy is False
