"""`igrad reproduce`: the demo preset end to end on tiny generated data (report structure, every
number finite, reuse on a second call), the ablation's grid and choice, and bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from igrad.cli import main
from igrad.errors import IgradError
from igrad.provenance import file_sha256
from igrad.reproduce import (
    CONTROL,
    EXPERIMENTS,
    FIGURE_METHODS,
    FINETUNED,
    LABELS,
    NETWORKS,
    SCOPES,
    ablation,
    figure_methods,
    preset_settings,
    reproduce,
)
from references import write_folder

TINY_TRAIN = {"width": 0.125, "epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "cos_samples": 8}
TINY_EVAL = {"limit": 6, "batch_size": 6}
#: The cpu preset's models: baseline, regularised, and each seed's fine-tuned model and its λ = 0 control.
CPU_MODELS = (*LABELS, FINETUNED, CONTROL, f"{FINETUNED}-seed1", f"{CONTROL}-seed1")


def _numbers(obj, path=""):
    """Every int/float leaf of a JSON object, with its path."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int | float):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture()
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))
    return write_folder(tmp_path / "data", n_train=8, n_test=4, size=12)


@pytest.mark.slow
def test_demo_preset_end_to_end_report_is_complete_finite_and_reused(tmp_path, data):
    out = tmp_path / "rep"
    kw = dict(train=TINY_TRAIN, evaluation=TINY_EVAL, figure_images=2, lam=0.5, quiet=True, progress=False)
    assert EXPERIMENTS["demo"]["default_networks"] == [NETWORKS[0]]  # the demo trains ResNet-18 alone
    report = reproduce("demo", data, out, networks=list(NETWORKS), **kw)

    # files: report, results, per-network evaluations with curves, figures, run folders
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    stored = json.loads((out / "results.json").read_text())
    assert stored["kind"] == "igrad.reproduce" and stored["provenance"]["versions"]["torch"]
    assert list(stored["networks"]) == list(NETWORKS)
    for net in NETWORKS:
        entry = stored["networks"][net]
        assert (out / entry["figure"]["path"]).stat().st_size > 1000
        # evenly spaced through the evaluated subset (its first and last image), not its first few
        subset = sorted(json.loads((out / "eval" / net / "baseline" / "results.json").read_text())["data"]["indices"])
        assert entry["figure"]["indices"] == [subset[0], subset[-1]]
        for label in LABELS:
            assert (out / entry["curves"][label]).stat().st_size > 1000
            assert (out / "runs" / net / label / "last.pt").is_file()
            assert entry["trained"][label] is True and entry["evaluation_reused"][label] is False
        assert entry["runs"]["baseline"]["lam"] == 0 and entry["runs"]["regularised"]["lam"] == 0.5
        assert entry["runs"]["regularised"]["config"]["model"] == net
        assert entry["runs"]["baseline"]["steps"] == 2  # the caller's budget wins over the preset's per network
        # the demo's regularised model fine-tunes the baseline's final weights with a fresh optimiser
        reg_config = entry["runs"]["regularised"]["config"]
        assert reg_config["init"] == str(out / "runs" / net / "baseline" / "last.pt")
        assert (reg_config["lr"], reg_config["epochs"]) == (0.005, 1) and entry["runs"]["regularised"]["steps"] == 4
        assert entry["runs"]["baseline"]["config"]["init"] is None
        # the same test subset for both models, every method with every metric
        base, reg = (json.loads((out / "eval" / net / lb / "results.json").read_text()) for lb in LABELS)
        assert base["data"]["indices"] == reg["data"]["indices"] and base["data"]["n"] == 6
        assert set(base["results"]) == set(EXPERIMENTS["demo"]["evaluate"]["methods"])
        assert all(set(d) == {"ad", "ag", "ai", "ins", "del"} for d in base["results"].values())
        cmp = entry["comparison"]
        assert cmp["paired"] and set(cmp["methods"]) == set(base["results"])
        w = entry["wins"]
        assert w["cells"] == 5 * len(base["results"]) == w["regularised"] + w["baseline"] + w["tie"]
        # Holm's correction is stricter than the per-cell interval: a Holm-significant cell is significant
        for side in LABELS:
            assert w[f"{side}_holm"] <= w[f"{side}_significant"] <= w[side]
        cells = [e for d in cmp["methods"].values() for e in d.values()]
        assert all(0 <= e["p"] <= 1 and (not e["holm_significant"] or e["significant"]) for e in cells)
        # accuracy with Wilson intervals around it, and the difference's interval around the difference
        acc = entry["accuracy"]
        for label in LABELS:
            a = acc[label]
            assert a["n"] == 16 and a["ci_low"] <= a["top1"] <= a["ci_high"]
            assert a["top1"] == pytest.approx(entry["runs"][label]["accuracy"])
        d = acc["difference"]
        assert d["mean"] == pytest.approx(acc["regularised"]["top1"] - acc["baseline"]["top1"])
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    numbers = list(_numbers(stored))
    assert len(numbers) > 100
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad
    assert 0 <= stored["networks"][NETWORKS[0]]["runs"]["baseline"]["accuracy"] <= 1

    # report.md: one docs/method.md §The reproduction table table per network, every method a row, every numeric cell
    # finite
    md = (out / "report.md").read_text()
    for heading in [f"## {n}" for n in NETWORKS] + ["## Configuration", "## Machine and versions"]:
        assert heading in md
    assert "igrad reproduce --preset demo" in md and "wall time" in md
    # what the demo can and cannot show, under the claim (not in the settings: they decide carry-over)
    assert f"Scope: {SCOPES['demo']}" in md and "far too small to test the claim" in md
    assert stored["scope"] == SCOPES["demo"] and "scope" not in stored["settings"]
    for method in EXPERIMENTS["demo"]["evaluate"]["methods"]:
        rows = [line for line in md.splitlines() if line.startswith(f"| {method} |")]
        assert len(rows) == len(NETWORKS)
        for row in rows:
            cells = [c.strip().strip("*\\†") for c in row.strip("|").split("|")[1:]]
            assert len(cells) == 10 and all(math.isfinite(float(c)) for c in cells)
    for key in ("top-1 accuracy (%)", "mean cos(δx, δᴳx)"):
        rows = [line for line in md.splitlines() if line.startswith(f"| {key} |")]
        assert len(rows) == len(NETWORKS)
        for row in rows:
            assert all(math.isfinite(float(c.strip().strip("*\\"))) for c in row.strip("|").split("|")[1:])
    assert not re.search(r"\bnan\b|\binf\b", md, re.IGNORECASE)
    assert FIGURE_METHODS == ("gradient", "guided", "gradcam", "scorecam")
    # the figure draws the maps the tables score: the demo evaluates Grad-CAM++, not Score-CAM
    for net in NETWORKS:
        assert stored["networks"][net]["figure"]["methods"] == ["gradient", "guided", "gradcam", "gradcam++"]
    assert "columns image, gradient, guided, gradcam, gradcam++;" in md

    # a second call trains nothing and reuses the evaluations; the numbers are the same
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/last.pt")}
    again = reproduce("demo", data, out, networks=list(NETWORKS), **kw)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/last.pt")} == stamps
    for net in NETWORKS:
        assert again["networks"][net]["trained"] == {lb: False for lb in LABELS}
        assert again["networks"][net]["evaluation_reused"] == {lb: True for lb in LABELS}
        assert again["networks"][net]["table"] == report["networks"][net]["table"]

    # a changed config is refused, not silently reused
    with pytest.raises(IgradError, match="cannot resume"):
        reproduce("demo", data, out, networks=list(NETWORKS), **{**kw, "train": {**TINY_TRAIN, "batch_size": 4}})


@pytest.mark.slow
def test_ablation_grid_validation_choice_and_cli(tmp_path, data, capsys):
    out = tmp_path / "abl"
    report = ablation(
        "demo",
        data,
        out,
        lambdas=(0.0, 0.5),
        errors=("cosine", "mse"),
        train=TINY_TRAIN,
        evaluation={"limit": 4, "batch_size": 4},
        quiet=True,
        progress=False,
    )
    rows = report["networks"][NETWORKS[0]]["rows"]
    assert [(r["lam"], r["error"]) for r in rows] == [(0.0, None), (0.5, "cosine"), (0.5, "mse")]
    for r in rows:
        assert r["n"] == 4 and set(r["gradcam"]) == {"ad", "ag", "ai", "ins", "del"}
        assert 0 <= r["val_acc"] <= 1 and -1 <= r["val_cos"] <= 1
    saved = json.loads((out / "ablation" / "results.json").read_text())
    assert all(math.isfinite(v) for _, v in _numbers(saved))
    # runs trained with different errors really differ in config
    assert {
        json.loads((out / "ablation" / "runs" / NETWORKS[0] / n / "run.json").read_text())["provenance"]["config"][
            "error"
        ]
        for n in ("cosine-lam0.5", "mse-lam0.5")
    } == {"cosine", "mse"}
    for r in rows[1:]:  # paired against λ = 0 on the same validation images
        assert set(r["vs_baseline"]) == {"ad", "ag", "ai", "ins", "del"}
        for k, e in r["vs_baseline"].items():
            assert e["baseline"] == rows[0]["gradcam"][k]["mean"] and e["regularised"] == r["gradcam"][k]["mean"]
            assert isinstance(e["significant"], bool)
    chosen = report["networks"][NETWORKS[0]]["chosen"]
    assert chosen["lam"] in (0.0, 0.5)
    md = (out / "ablation" / "report.md").read_text()
    assert md.count("| 0.5 |") == 2 and "validation split" in md

    # bad input: one line, exit status 2
    assert main(["reproduce", "--preset", "demo", "--data", str(data), "--out", str(out), "--networks", "resnet9"]) == 2
    err = capsys.readouterr().err
    assert "resnet9" in err and "Traceback" not in err


def test_figure_methods_are_the_papers_where_evaluated_else_evaluated_ones():
    assert figure_methods(["cam", "gradcam", "scorecam", "gradient", "guided"]) == list(FIGURE_METHODS)
    demo = ["gradient", "guided", "gradcam", "gradcam++"]  # the demo's methods: Grad-CAM++ in Score-CAM's place
    assert figure_methods(demo) == demo
    assert figure_methods(["gradcam", "layercam", "cam"]) == ["layercam", "cam", "gradcam"]
    assert figure_methods(["gradient"]) == ["gradient"]


def test_preset_settings_are_data_and_checked():
    s = preset_settings("cpu", train={"epochs": 1}, evaluation={"limit": 10}, lam=0.1)
    assert s["train"]["epochs"] == 1 and s["evaluate"]["limit"] == 10 and s["lam"] == 0.1
    assert "epochs" not in EXPERIMENTS["cpu"]["train"]  # a copy: the preset itself unchanged
    with pytest.raises(IgradError, match="preset"):
        preset_settings("tiny")
    with pytest.raises(IgradError, match="λ > 0"):
        preset_settings("demo", lam=0)
    with pytest.raises(IgradError, match="evaluation setting"):
        preset_settings("demo", evaluation={"limt": 3})


def test_ablation_choice_prefers_clear_wins_and_says_when_there_are_none():
    from igrad.reproduce import _ablation_choice

    def row(lam, acc, outcome):  # outcome per metric: (better, significant)
        vs = {k: {"better": b, "significant": sig} for k, (b, sig) in zip("abcde", outcome, strict=True)}
        gradcam = dict.fromkeys(vs)
        return {"lam": lam, "error": "cosine", "val_acc": acc, "val_cos": 0.1, "gradcam": gradcam, "vs_baseline": vs}

    base = {"lam": 0.0, "error": None, "val_acc": 0.50, "val_cos": 0.1, "gradcam": dict.fromkeys("abcde")}
    many_wins = row(0.1, 0.50, [("regularised", False)] * 4 + [("baseline", False)])
    one_clear = row(0.2, 0.50, [("regularised", True)] + [("baseline", False)] * 4)
    too_costly = row(0.3, 0.40, [("regularised", True)] * 5)  # 10 points of accuracy lost: out of the margin
    chosen = _ablation_choice([base, many_wins, one_clear, too_costly], acc_margin=0.02)
    assert (chosen["lam"], chosen["clear"], chosen["wins"]) == (0.2, 1, 1) and "note" not in chosen
    chosen = _ablation_choice([base, many_wins], acc_margin=0.02)
    assert (chosen["lam"], chosen["clear"], chosen["wins"]) == (0.1, 0, 4) and "noise" in chosen["note"]
    assert _ablation_choice([base, too_costly], acc_margin=0.02)["lam"] == 0.0


@pytest.mark.slow
def test_one_network_at_a_time_ends_in_one_report(tmp_path, data, monkeypatch):
    """Each call trains the networks it is given; a network of an earlier report made with the same preset,
    settings and data is kept as it was (a reproduction spread over working sessions); other settings drop it."""
    out = tmp_path / "rep"
    kw = dict(train=TINY_TRAIN, evaluation=TINY_EVAL, figure_images=1, lam=0.5, quiet=True, progress=False)
    first = reproduce("demo", data, out, networks=[NETWORKS[1]], **{**kw, "train": {**TINY_TRAIN, "amp": False}})
    assert list(first["networks"]) == [NETWORKS[1]]
    made = first["networks"][NETWORKS[1]]["made_by"]
    assert made["precision"] == {"training": dict.fromkeys(LABELS, "float32"), "evaluation": "float32"}
    assert made["command"] == first["command"] and made["commit"] == first["provenance"]["commit"]
    # a report written before the fine-tuned model existed has no such setting: the same as none; one written
    # before networks said what made them gets it from the report's own command and provenance
    stored = json.loads((out / "results.json").read_text())
    assert stored["settings"].pop("finetuned") is None
    del stored["networks"][NETWORKS[1]]["made_by"]
    stored["command"], stored["provenance"]["commit"] = "igrad reproduce (the first call)", "feedbeef"
    (out / "results.json").write_text(json.dumps(stored))
    # another session, another thread count (a resource, not a setting) and bf16 (a precision, not a setting:
    # a machine with bf16 units), the same data folder named by a relative path through a link: still one report
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(data.parent)
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = os.path.join("..", "link", data.name)
    assert relative != str(data)
    bf16 = {**TINY_TRAIN, "threads": 1, "amp": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on a CPU without bf16 units
        second = reproduce("demo", relative, out, networks=[NETWORKS[0]], **{**kw, "train": bf16})
    assert list(second["networks"]) == list(NETWORKS)  # the paper's order
    kept = dict(second["networks"][NETWORKS[1]])
    assert kept.pop("made_by") == {
        "from_report": True,
        **made,
        "command": "igrad reproduce (the first call)",
        "commit": "feedbeef",
        "machine": stored["provenance"]["machine"],
        "time": stored["provenance"]["time"],
    }
    assert kept == {k: v for k, v in json.loads(json.dumps(first["networks"][NETWORKS[1]])).items() if k != "made_by"}
    new = second["networks"][NETWORKS[0]]["made_by"]
    assert new["precision"] == {"training": dict.fromkeys((*LABELS,), "bf16"), "evaluation": "bf16"}
    md = (out / "report.md").read_text()
    assert all(f"## {n}" in md for n in NETWORKS)
    # each network's section says what made it, at which precision
    sections = {n: md.split(f"## {n}")[1].split("\n## ")[0] for n in NETWORKS}
    first_call = "Carried from an earlier report written by `igrad reproduce (the first call)`: training in **float32**"
    assert first_call in sections[NETWORKS[1]]
    assert "commit feedbeef" in sections[NETWORKS[1]]
    assert (
        f"Made by `{second['command']}`: training in **bf16**, saliency maps and metrics in **bf16**"
        in (sections[NETWORKS[0]])
    )
    assert "networks differ in `model`, `amp`):" in md  # not the data folder, named otherwise, nor threads
    # other evaluation settings: the earlier network is not carried over into a report it was not made for
    seed1 = {**TINY_EVAL, "seed": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        third = reproduce("demo", data, out, networks=[NETWORKS[0]], **{**kw, "train": bf16, "evaluation": seed1})
    assert list(third["networks"]) == [NETWORKS[0]]
    # the same settings on another data folder: the earlier network is not carried over either
    other = write_folder(tmp_path / "other", n_train=8, n_test=4, size=12)
    fp32 = {**TINY_TRAIN, "amp": False}
    fourth = reproduce("demo", other, out, networks=[NETWORKS[1]], **{**kw, "train": fp32, "evaluation": seed1})
    assert list(fourth["networks"]) == [NETWORKS[1]]


@pytest.mark.slow
def test_cli_prints_a_short_summary(tmp_path, data, capsys):
    out = tmp_path / "rep"
    args = ["reproduce", "--preset", "demo", "--data", str(data), "--out", str(out), "--epochs", "1", "--limit", "4"]
    assert main([*args, "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((out / "results.json").read_text())
    entry = stored["networks"][NETWORKS[0]]
    acc = entry["accuracy"]
    head = f"{NETWORKS[0]}: top-1 {100 * acc['baseline']['top1']:.1f}% → {100 * acc['regularised']['top1']:.1f}%"
    assert head in printed and "cos(δx, δᴳx)" in printed and "after Holm" in printed
    for method, per in entry["comparison"]["methods"].items():
        row = next(line for line in printed.splitlines() if line.strip().startswith(method + " "))
        ad = per["ad"]
        assert f"{ad['baseline']:.1f} → {ad['regularised']:.1f}" in row
    assert f"figure: {out / entry['figure']['path']}" in printed and f"report: {out / 'report.md'}" in printed
    assert list(stored["networks"]) == [NETWORKS[0]]


def _no_evaluation_here(*args, **kwargs):
    raise AssertionError("evaluated in the parent process: with --jobs the children evaluate")


@pytest.mark.slow
def test_side_by_side_training_equals_one_after_another(tmp_path, data, capfd, monkeypatch):
    """jobs=2 trains the two models in two processes at once; their weights are exactly those of the
    sequential run (same seeds, one thread each), and the report says they were trained."""
    kw = dict(train={**TINY_TRAIN, "threads": 1}, evaluation=TINY_EVAL, figure_images=1, lam=0.5, quiet=True)
    kw["progress"] = False
    a = reproduce("cpu", data, tmp_path / "a", networks=[NETWORKS[0]], **kw)
    capfd.readouterr()
    monkeypatch.setattr("igrad.reproduce.evaluate_model", _no_evaluation_here)  # the spawned children keep theirs
    b = reproduce("cpu", data, tmp_path / "b", networks=[NETWORKS[0]], jobs=2, **kw)
    # each child's epoch line says which model it is about
    printed = capfd.readouterr().out.splitlines()
    for label in LABELS:
        assert sum(line.startswith(f"[{label}] epoch 1/1") for line in printed) == 1, printed
    # the cpu preset's fine-tuned models (each seed's, and its control) wait for the baseline, then train in a
    # free process; each model is evaluated in a free process too (the same tables below), none of it reused
    for label in CPU_MODELS[2:]:
        assert sum(line.startswith(f"[{label}] epoch 1/") for line in printed) == 1, printed
    for label in CPU_MODELS:
        assert sum(line.startswith(f"[{label}] evaluated in") for line in printed) == 1, printed
    assert b["networks"][NETWORKS[0]]["trained"] == {lb: True for lb in CPU_MODELS}
    assert b["networks"][NETWORKS[0]]["evaluation_reused"] == {lb: False for lb in CPU_MODELS}
    for label in CPU_MODELS:
        wa = torch.load(tmp_path / "a" / "runs" / NETWORKS[0] / label / "last.pt", weights_only=True)["model"]
        wb = torch.load(tmp_path / "b" / "runs" / NETWORKS[0] / label / "last.pt", weights_only=True)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["networks"][NETWORKS[0]]["table"] == b["networks"][NETWORKS[0]]["table"]


@pytest.mark.slow
def test_side_by_side_runs_only_what_is_missing(tmp_path, data, capfd, monkeypatch):
    """With --jobs on a folder where some work is done, the children run only the missing evaluations (the
    others are reused, and said to be); a run whose budget was raised resumes in a child, and only then is it
    evaluated (an evaluation process never trains)."""
    out = tmp_path / "rep"
    kw = dict(evaluation=TINY_EVAL, figure_images=1, lam=0.5, quiet=True, progress=False, networks=[NETWORKS[0]])
    one_thread = {**TINY_TRAIN, "threads": 1}
    reproduce("cpu", data, out, train=one_thread, **kw)
    for label in (LABELS[1], FINETUNED):  # the others' evaluations are kept
        (out / "eval" / NETWORKS[0] / label / "results.json").unlink()
    capfd.readouterr()
    monkeypatch.setattr("igrad.reproduce.evaluate_model", _no_evaluation_here)
    entry = reproduce("cpu", data, out, train=one_thread, jobs=2, **kw)["networks"][NETWORKS[0]]
    assert entry["trained"] == dict.fromkeys(CPU_MODELS, False)
    assert entry["evaluation_reused"] == {lb: lb not in (LABELS[1], FINETUNED) for lb in CPU_MODELS}
    printed = capfd.readouterr().out.splitlines()
    assert sorted(line.split("]")[0][1:] for line in printed if " evaluated in " in line) == sorted(
        [LABELS[1], FINETUNED]
    )
    # one more epoch for both (the fine-tuned model left out: its starting weights would change, which is refused)
    more = {**one_thread, "epochs": 2}
    entry = reproduce("cpu", data, out, train=more, finetuned={}, jobs=2, **kw)["networks"][NETWORKS[0]]
    assert entry["trained"] == dict.fromkeys(LABELS, True)
    assert entry["evaluation_reused"] == dict.fromkeys(LABELS, False)
    printed = capfd.readouterr().out.splitlines()
    for label in LABELS:
        assert json.loads((out / "runs" / NETWORKS[0] / label / "run.json").read_text())["epochs_done"] == 2
        assert sum(line.startswith(f"[{label}] epoch 2/2") for line in printed) == 1, printed
        assert sum(line.startswith(f"[{label}] evaluated in") for line in printed) == 1, printed


def _children(pid: int) -> list[int]:
    """The side-by-side workers of process ``pid`` (multiprocessing's spawned children, not its resource
    tracker), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the child processes in /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_side_by_side_children_end_when_the_parent_is_killed(tmp_path, data, sig):
    """``reproduce --jobs 2`` killed (SIGKILL, or SIGTERM as ``kill`` and a session's end send it) must not
    leave its two training children running on, unseen, into the run folders a resumed run then shares."""
    train = {**TINY_TRAIN, "epochs": 10_000, "threads": 1}  # long enough to be killed mid-training
    code = (
        "import sys; from igrad.reproduce import reproduce; "
        f"reproduce('cpu', sys.argv[1], sys.argv[2], networks=[{NETWORKS[0]!r}], jobs=2, train={train!r}, "
        f"evaluation={TINY_EVAL!r}, quiet=True, progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", code, str(data), str(tmp_path / "out")], env=env)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(children) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.5)
            children = _children(parent.pid)
        assert len(children) == 2, f"the two training children did not start (parent exit {parent.poll()})"
        # both are training: their run folders have a first checkpoint
        runs = tmp_path / "out" / "runs" / NETWORKS[0]
        while time.monotonic() < deadline and not all((runs / lb / "last.pt").is_file() for lb in LABELS):
            time.sleep(0.5)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20  # the watchdog looks once a second
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [c for c in children if _alive(c)], "training children outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)


@pytest.mark.slow
def test_finetuned_third_model_starts_from_the_baseline_and_is_compared_with_it(tmp_path, data, capsys):
    """A preset's ``finetuned`` model: trained from the baseline's final weights (its checkpoint records the
    file's SHA-256) at its own λ and budget, evaluated on the same images, compared with the baseline like the
    regularised model (the baseline's cells identical in both comparisons, the other side its own results),
    reported in report.md, the terminal summary and the figure, and reused on a second call."""
    out = tmp_path / "ft"
    ft = {"lam": 0.5, "train": {"epochs": 1, "lr": 0.01}}
    kw = dict(train=TINY_TRAIN, evaluation=TINY_EVAL, figure_images=2, lam=0.25, quiet=True, progress=False)
    report = reproduce("demo", data, out, networks=[NETWORKS[0]], finetuned=ft, **kw)
    net = NETWORKS[0]
    entry, runs = report["networks"][net], out / "runs" / net
    row = entry["runs"][FINETUNED]
    assert row["lam"] == 0.5 and row["config"]["init"] == str(runs / "baseline" / "last.pt")
    assert (row["config"]["epochs"], row["config"]["lr"], row["epochs"]) == (1, 0.01, 1)
    state = torch.load(runs / FINETUNED / "last.pt", weights_only=True)
    assert state["config"]["init_sha256"] == file_sha256(runs / "baseline" / "last.pt")
    own = json.loads((out / "eval" / net / FINETUNED / "results.json").read_text())
    base = json.loads((out / "eval" / net / "baseline" / "results.json").read_text())
    assert own["data"]["indices"] == base["data"]["indices"]
    versus = entry[FINETUNED]
    assert versus["lam"] == 0.5 and versus["comparison"]["paired"]
    for method, per in versus["comparison"]["methods"].items():
        for k, cell in per.items():
            assert cell["baseline"] == entry["comparison"]["methods"][method][k]["baseline"]
            assert cell["regularised"] == pytest.approx(own["results"][method][k]["mean"], rel=1e-9, abs=1e-12)
    assert versus["accuracy"]["regularised"]["top1"] == pytest.approx(row["accuracy"])
    w = versus["wins"]
    assert w["cells"] == w["regularised"] + w["baseline"] + w["tie"] == 5 * len(own["results"])
    assert set(entry["curves"]) == {*LABELS, FINETUNED} and (out / entry["curves"][FINETUNED]).is_file()
    # its own comparison files beside the regularised model's: the fine-tuned model's means, not the other's
    files = json.loads((out / "eval" / net / "compare-fine-tuned.json").read_text())
    assert files["labels"] == ["baseline", FINETUNED]
    assert files["checkpoints"] == [base["checkpoint"], own["checkpoint"]]
    assert files["comparison"]["methods"] == versus["comparison"]["methods"]
    table = (out / "eval" / net / "compare-fine-tuned.md").read_text()
    assert "| | baseline | fine-tuned |" in table
    cos_row = next(line for line in table.splitlines() if line.startswith("| mean cos"))
    assert f"{own['model']['cos']['mean']:.4f}" in cos_row and f"{base['model']['cos']['mean']:.4f}" in cos_row
    assert json.loads((out / "eval" / net / "compare.json").read_text())["checkpoints"][1] != own["checkpoint"]

    md = (out / "report.md").read_text()
    assert f"### {net}: the baseline fine-tuned with λ = 0.5" in md and "Fine-tuned better in" in md
    for method in own["results"]:
        assert len([line for line in md.splitlines() if line.startswith(f"| {method} |")]) == 2
    assert "one row per model: baseline, regularised, fine-tuned" in md

    from igrad.report import terminal_summary

    summary = terminal_summary(report, out)
    acc = versus["accuracy"]
    assert f"{net}, fine-tuned λ = 0.5 vs the baseline: top-1 {100 * acc['baseline']['top1']:.1f}% → " in summary
    assert "fine-tuned better in" in summary

    again = reproduce("demo", data, out, networks=[NETWORKS[0]], finetuned=ft, **kw)
    assert again["networks"][net]["trained"] == {lb: False for lb in (*LABELS, FINETUNED)}
    assert again["networks"][net]["evaluation_reused"] == {lb: True for lb in (*LABELS, FINETUNED)}
    assert again["networks"][net][FINETUNED]["table"] == versus["table"]


def test_finetuned_settings_are_checked_and_the_cli_can_skip_them(tmp_path, data, monkeypatch):
    cpu = {"lam": 0.75, "train": {"epochs": 3, "lr": 0.01}, "control": True, "seeds": [0, 1]}
    assert preset_settings("cpu")["finetuned"] == cpu
    assert preset_settings("cpu", finetuned={})["finetuned"] is None
    assert preset_settings("demo")["finetuned"] is None
    with pytest.raises(IgradError, match="λ > 0"):
        preset_settings("demo", finetuned={"lam": 0})
    with pytest.raises(IgradError, match="'lam', 'train', 'control' and 'seeds'"):
        preset_settings("demo", finetuned={"lam": 0.5, "epochs": 3})
    for seeds in ([], [0, 0], [0, 1.5], [True], 3):
        with pytest.raises(IgradError, match="distinct integers"):
            preset_settings("demo", finetuned={"lam": 0.5, "seeds": seeds})
    with pytest.raises(IgradError, match="'control' must be true or false"):
        preset_settings("demo", finetuned={"lam": 0.5, "control": "yes"})
    seen = {}

    def fake(preset, data, out, **kw):
        seen.update(kw)
        raise IgradError("stop here")

    monkeypatch.setattr("igrad.reproduce.reproduce", fake)
    args = ["reproduce", "--preset", "cpu", "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--no-finetuned"]) != 0 and seen["finetuned"] == {}
    assert main(args) != 0 and seen["finetuned"] is None and seen["runs"] is None
    assert main([*args, "--runs", str(tmp_path / "runs")]) != 0 and seen["runs"] == str(tmp_path / "runs")
    assert "amp" not in seen["train"] and "amp" not in seen["evaluation"]  # the preset's
    for flag, amp in (("--no-amp", False), ("--amp", True)):
        assert main([*args, flag]) != 0
        assert seen["train"]["amp"] is amp and seen["evaluation"]["amp"] is amp


def test_prefixed_stream_prefixes_every_line_and_keeps_an_unfinished_one():
    import io

    from igrad.reproduce import _Prefixed

    sink = io.StringIO()
    stream = _Prefixed(sink, "[baseline] ")
    stream.write("epoch 1/2 loss 1.0\nepoch 2")
    stream.write("/2 loss 0.5\nlast words")
    assert sink.getvalue() == "[baseline] epoch 1/2 loss 1.0\n[baseline] epoch 2/2 loss 0.5\n"
    stream.flush()
    assert sink.getvalue().endswith("[baseline] last words")
    assert stream.getvalue() == sink.getvalue()  # anything else is the stream's own (isatty, encoding, ...)


def _per_image(res, method, metric):
    return torch.tensor(res["per_sample"]["methods"][method][metric], dtype=torch.float64)


@pytest.mark.slow
def test_fine_tuned_controls_and_seeds_isolate_L_R_and_the_weights_re_evaluate(tmp_path, data, capsys):
    """With ``control`` and two ``seeds``: each fine-tuned model has a λ = 0 control that differs from it in λ
    alone, trained in a run folder outside ``out`` (``runs``); each pair's cells are the per-image differences
    (checked by hand against the stored per-image values), and the seed table's counts are recomputed from them;
    every model's weights are written beside the report, and the report's own command re-evaluates one to the
    same cells; a second call trains, evaluates and writes nothing."""
    out, runs = tmp_path / "rep", tmp_path / "elsewhere" / "runs"
    ft = {"lam": 0.5, "train": {"epochs": 1, "lr": 0.01}, "control": True, "seeds": [0, 1]}
    kw = dict(train=TINY_TRAIN, evaluation=TINY_EVAL, figure_images=2, lam=0.25, quiet=True, progress=False)
    net = NETWORKS[0]
    report = reproduce("demo", data, out, networks=[net], finetuned=ft, runs=runs, **kw)
    labels = [
        "baseline",
        "regularised",
        "fine-tuned",
        "fine-tuned-control",
        "fine-tuned-seed1",
        "fine-tuned-control-seed1",
    ]
    entry = report["networks"][net]
    assert list(entry["runs"]) == labels
    assert not (out / "runs").exists() and all((runs / net / lb / "last.pt").is_file() for lb in labels)

    # a control differs from its fine-tuned model in λ alone (and its folder); both start from the baseline
    configs = {lb: entry["runs"][lb]["config"] for lb in labels}
    for model, control, seed in (
        ("fine-tuned", "fine-tuned-control", 0),
        ("fine-tuned-seed1", "fine-tuned-control-seed1", 1),
    ):
        a, b = dict(configs[model]), dict(configs[control])
        assert (a.pop("lam"), b.pop("lam")) == (0.5, 0.0) and a.pop("out") != b.pop("out")
        assert a == b and a["seed"] == seed and a["init"] == str(runs / net / "baseline" / "last.pt")
    assert configs["fine-tuned"]["seed"] == configs["baseline"]["seed"] == 0

    stored = {lb: json.loads((out / "eval" / net / lb / "results.json").read_text()) for lb in labels}
    pairs = entry["fine-tuning"]["pairs"]
    assert [(p["model"], p["control"], p["seed"]) for p in pairs] == [
        ("fine-tuned", "fine-tuned-control", 0),
        ("fine-tuned-seed1", "fine-tuned-control-seed1", 1),
    ]
    cells = [(m, k) for m in stored["baseline"]["results"] for k in stored["baseline"]["results"][m]]
    effects = []
    for pair in pairs:
        per = []
        for m, k in cells:
            by_hand = (_per_image(stored[pair["model"]], m, k) - _per_image(stored[pair["control"]], m, k)).mean()
            assert pair["comparison"]["methods"][m][k]["difference"]["mean"] == pytest.approx(float(by_hand), abs=1e-12)
            per.append(float(by_hand))
        effects.append(per)
        files = json.loads((out / "eval" / net / f"compare-{pair['model']}-vs-control.json").read_text())
        assert files["labels"] == [pair["control"], pair["model"]]
    noise = entry["fine-tuning"]["seed_noise"]
    assert len(noise) == 1 and noise[0]["seeds"] == [0, 1]
    control_diff = [
        float(
            (
                _per_image(stored["fine-tuned-control-seed1"], m, k) - _per_image(stored["fine-tuned-control"], m, k)
            ).mean()
        )
        for m, k in cells
    ]
    summary = noise[0]["summary"]
    same = [a * b > 0 for a, b in zip(*effects, strict=True)]
    assert summary["cells"] == len(cells) and summary["same_sign"] == sum(same)
    assert summary["noise_max"] == pytest.approx(max(abs(d) for d in control_diff), abs=1e-12)
    beyond = sum(s and min(abs(a), abs(b)) > abs(d) for s, a, b, d in zip(same, *effects, control_diff, strict=True))
    assert summary["beyond_noise"] == beyond

    md = (out / "report.md").read_text()
    for heading in (
        f"### {net}: fine-tuned with λ = 0.5 against its λ = 0 control (seed 0)",
        f"### {net}: fine-tuned with λ = 0.5 against its λ = 0 control (seed 1)",
        f"### {net}: L_R's effect at two seeds, beside the training's own noise",
        f"### {net}: the baseline fine-tuned with λ = 0.5, against the baseline",
    ):
        assert heading in md
    assert md.index("against its λ = 0 control (seed 0)") < md.index("against the baseline")
    assert "one row per model: baseline, regularised, fine-tuned, fine-tuned-control" in md
    assert "control better in" in md

    # the weights: model state and config alone, the same tensors as the run's final checkpoint
    for lb in labels:
        w = entry["runs"][lb]["weights"]
        path = out / w["path"]
        assert w["path"] == f"weights/{net}/{lb}.pt" and w["sha256"] == file_sha256(path) in md
        state = torch.load(path, weights_only=True)
        assert set(state) == {"model", "config", "provenance", "format"}
        last = torch.load(runs / net / lb / "last.pt", weights_only=True)
        assert state["config"] == last["config"] and state["model"].keys() == last["model"].keys()
        assert all(
            torch.equal(v, last["model"][k]) and v.dtype == torch.float32
            for k, v in state["model"].items()
            if v.is_floating_point()
        )
    # the report's re-evaluation command, run from the report's folder, gives the stored cells
    command = re.search(r"Re-evaluating one gives its cells above \(run from this report's folder\): `([^`]+)`", md)
    args = shlex.split(command.group(1))
    assert args[:2] == ["igrad", "evaluate"] and f"weights/{net}/baseline.pt" in args
    cwd = os.getcwd()
    try:
        os.chdir(out)
        assert main(args[1:] + ["--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    capsys.readouterr()
    again = json.loads((out / "recheck" / "baseline" / "results.json").read_text())
    assert again["data"]["indices"] == stored["baseline"]["data"]["indices"]
    for m, k in cells:
        assert again["results"][m][k]["mean"] == stored["baseline"]["results"][m][k]["mean"]
    assert again["model"]["accuracy"] == stored["baseline"]["model"]["accuracy"]

    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("weights/*/*.pt"), *runs.glob("*/*/last.pt")]}
    second = reproduce("demo", data, out, networks=[net], finetuned=ft, runs=runs, **kw)
    assert second["networks"][net]["trained"] == dict.fromkeys(labels, False)
    assert second["networks"][net]["evaluation_reused"] == dict.fromkeys(labels, True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_seed_summary_counts_by_hand():
    from igrad.reproduce import seed_summary

    def cmp(*cells):
        return {
            "methods": {"m": {f"k{i}": {"difference": {"mean": d}, "significant": s} for i, (d, s) in enumerate(cells)}}
        }

    a = cmp((0.10, True), (-0.02, False), (0.03, True), (0.0, False))
    b = cmp((0.05, True), (0.01, False), (0.04, False), (0.02, False))
    noise = cmp((0.01, False), (0.03, True), (-0.05, True), (0.0, False))
    assert seed_summary(a, b, noise) == {
        "cells": 4,
        "same_sign": 2,  # k0 and k2; k1 differs, k3 has no sign
        "replicated": 1,  # k0 significant at both
        "noise_max": 0.05,
        "noise_median": 0.02,
        "noise_significant": 2,
        "beyond_noise": 1,  # k0: 0.05 > 0.01; k2: 0.03 < 0.05
    }
    with pytest.raises(IgradError, match="paired"):
        seed_summary({"methods": {"m": {f"k{i}": {} for i in range(4)}}}, b, noise)  # unpaired: no differences


def test_an_earlier_network_without_controls_is_carried_and_says_so():
    """A report made before the fine-tuned models had controls and seeds is the same experiment: its networks
    are carried (compared on λ and the fine-tuning's budget), and a changed λ or budget still drops them."""
    from igrad.reproduce import _comparable

    new = preset_settings("cpu")
    old = copy.deepcopy(new)
    old["finetuned"] = {"lam": 0.75, "train": {"epochs": 3, "lr": 0.01}}
    assert _comparable(old) == _comparable(new)
    other = copy.deepcopy(old)
    other["finetuned"]["train"]["lr"] = 0.02
    assert _comparable(other) != _comparable(new)
