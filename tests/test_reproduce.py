"""`igrad reproduce`: the demo preset end to end on tiny generated data (report structure, every
number finite, reuse on a second call), the ablation's grid and choice, and bad input."""

from __future__ import annotations

import json
import math
import os
import re
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

    # report.md: one SPEC 5 table per network, every method a row, every numeric cell finite
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
    # the cpu preset's fine-tuned third model waits for the baseline, then trains in a free process; each
    # model is evaluated in a free process too (the same tables below), none of it reused from an earlier call
    assert sum(line.startswith(f"[{FINETUNED}] epoch 1/") for line in printed) == 1, printed
    for label in (*LABELS, FINETUNED):
        assert sum(line.startswith(f"[{label}] evaluated in") for line in printed) == 1, printed
    assert b["networks"][NETWORKS[0]]["trained"] == {lb: True for lb in (*LABELS, FINETUNED)}
    assert b["networks"][NETWORKS[0]]["evaluation_reused"] == {lb: False for lb in (*LABELS, FINETUNED)}
    for label in (*LABELS, FINETUNED):
        wa = torch.load(tmp_path / "a" / "runs" / NETWORKS[0] / label / "last.pt", weights_only=True)["model"]
        wb = torch.load(tmp_path / "b" / "runs" / NETWORKS[0] / label / "last.pt", weights_only=True)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["networks"][NETWORKS[0]]["table"] == b["networks"][NETWORKS[0]]["table"]


def test_side_by_side_runs_only_what_is_missing(tmp_path, data, capfd, monkeypatch):
    """With --jobs on a folder where some work is done, the children run only the missing evaluations (the
    others are reused, and said to be); a run whose budget was raised resumes in a child, and only then is it
    evaluated (an evaluation process never trains)."""
    out = tmp_path / "rep"
    kw = dict(evaluation=TINY_EVAL, figure_images=1, lam=0.5, quiet=True, progress=False, networks=[NETWORKS[0]])
    one_thread = {**TINY_TRAIN, "threads": 1}
    reproduce("cpu", data, out, train=one_thread, **kw)
    for label in (LABELS[1], FINETUNED):
        (out / "eval" / NETWORKS[0] / label / "results.json").unlink()
    capfd.readouterr()
    monkeypatch.setattr("igrad.reproduce.evaluate_model", _no_evaluation_here)
    entry = reproduce("cpu", data, out, train=one_thread, jobs=2, **kw)["networks"][NETWORKS[0]]
    assert entry["trained"] == dict.fromkeys((*LABELS, FINETUNED), False)
    assert entry["evaluation_reused"] == {LABELS[0]: True, LABELS[1]: False, FINETUNED: False}
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
    assert f"{net}, fine-tuned λ = 0.5: top-1 {100 * acc['baseline']['top1']:.1f}% → " in summary
    assert "fine-tuned better in" in summary

    again = reproduce("demo", data, out, networks=[NETWORKS[0]], finetuned=ft, **kw)
    assert again["networks"][net]["trained"] == {lb: False for lb in (*LABELS, FINETUNED)}
    assert again["networks"][net]["evaluation_reused"] == {lb: True for lb in (*LABELS, FINETUNED)}
    assert again["networks"][net][FINETUNED]["table"] == versus["table"]


def test_finetuned_settings_are_checked_and_the_cli_can_skip_them(tmp_path, data, monkeypatch):
    assert preset_settings("cpu")["finetuned"] == {"lam": 0.75, "train": {"epochs": 3, "lr": 0.01}}
    assert preset_settings("cpu", finetuned={})["finetuned"] is None
    assert preset_settings("demo")["finetuned"] is None
    with pytest.raises(IgradError, match="λ > 0"):
        preset_settings("demo", finetuned={"lam": 0})
    with pytest.raises(IgradError, match="'lam' and 'train'"):
        preset_settings("demo", finetuned={"lam": 0.5, "epochs": 3})
    seen = {}

    def fake(preset, data, out, **kw):
        seen.update(kw)
        raise IgradError("stop here")

    monkeypatch.setattr("igrad.reproduce.reproduce", fake)
    args = ["reproduce", "--preset", "cpu", "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--no-finetuned"]) != 0 and seen["finetuned"] == {}
    assert main(args) != 0 and seen["finetuned"] is None
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
