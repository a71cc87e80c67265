"""The trade-off study's report (experiments/tradeoff_report.py): the choice rule that set the ``cpu``
reproduction's λ, and which control each run is compared with, on hand-made run rows whose answers are
known by construction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "tradeoff_report.py"
_spec = importlib.util.spec_from_file_location("tradeoff_report", _PATH)
assert _spec is not None and _spec.loader is not None
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)

N = 5000  # validation images


def _row(run: str, group: str, correct: int, cos: float, n: int = N, **config) -> dict:
    c = {"lam": 0.0, "lr": 0.1, "width": 0.5, "threads": 1, "out": f"runs/{run}", "data": "d", **config}
    return {
        "run": run,
        "group": group,
        "val_acc": correct / n,
        "config": c,
        "evaluation": {"data": {"n_total": n}, "model": {"cos": {"mean": cos}}},
    }


def _runs(*rows: dict) -> dict:
    return {r["run"]: r for r in rows}


def test_choice_takes_the_largest_cos_at_or_above_the_floor_counted_in_images():
    # scratch-lam0: 2548 of 5000; the floor is 1 point less, 2498 images: a run at exactly 2498 qualifies
    # (in floats 2548/5000 - 0.01 = 0.49960000000000004 > 2498/5000), one at 2497 does not
    runs = _runs(
        _row("scratch-lam0", "scratch", 2548, 0.02),
        _row("scratch-lam0.075", "scratch", 2498, 0.12, lam=0.075),
        _row("scratch-lam0.25", "scratch", 2497, 0.67, lam=0.25),
        _row("warmup-lam0.75-warm3", "warmup", 2400, 0.83, lam=0.75, lam_warmup=3.0),
        _row("ft-lam0.75", "finetune", 3400, 0.23, lam=0.75, lr=0.01),  # fine-tuning is not a candidate
        _row("width1-lam0.75", "width", 2800, 0.90, lam=0.75, width=1.0),  # nor another budget
    )
    choice = tr.choose(runs)
    assert choice["run"] == "scratch-lam0.075" and choice["lam"] == 0.075
    assert choice["accuracy_floor"] == 2498 / N
    assert choice["candidates"] == ["scratch-lam0", "scratch-lam0.075", "scratch-lam0.25", "warmup-lam0.75-warm3"]
    # a warm-up run above the floor with more alignment wins, and reports its warm-up
    runs["warmup-lam0.75-warm3"] = _row("warmup-lam0.75-warm3", "warmup", 2547, 0.83, lam=0.75, lam_warmup=3.0)
    choice = tr.choose(runs)
    assert (choice["run"], choice["lam"], choice["lam_warmup"]) == ("warmup-lam0.75-warm3", 0.75, 3.0)
    # nothing regularised within the floor: λ = 0 itself is what the rule returns
    only = _runs(_row("scratch-lam0", "scratch", 2750, 0.02), _row("scratch-lam0.75", "scratch", 700, 0.9, lam=0.75))
    assert tr.choose(only)["lam"] == 0.0


def test_choice_waits_for_the_control_and_refuses_another_validation_size():
    assert tr.choose(_runs(_row("scratch-lam0.075", "scratch", 2700, 0.12, lam=0.075)))["lam"] is None
    runs = _runs(_row("scratch-lam0", "scratch", 2750, 0.02), _row("scratch-lam0.1", "scratch", 270, 0.3, n=500))
    with pytest.raises(SystemExit, match="scratch-lam0.1 was validated on 500 images"):
        tr.choose(runs)


def test_each_run_is_compared_with_the_lam0_run_of_its_own_budget():
    runs = _runs(
        _row("scratch-lam0", "scratch", 2750, 0.02),
        _row("scratch-lam0.25", "scratch", 1800, 0.67, lam=0.25),
        _row("ft-lam0", "finetune", 3450, 0.0, lr=0.01),
        _row("ft-lam0-lr0.001", "finetune", 3458, 0.0, lr=0.001),
        _row("ft-lam2.5-lr0.001", "finetune", 3328, 0.21, lam=2.5, lr=0.001),
        _row("width0.25-lam0", "width", 1468, 0.05, width=0.25),
        _row("width1-lam0", "width", 1927, 0.03, width=1.0),
        _row("width1-lam0.75", "width", 300, 0.9, lam=0.75, width=1.0),
        # the score ablation: the probability run against its logit twin of the same recipe, whatever the
        # resources (threads, output folder) each ran with; not against another λ's twin
        _row("score-logit-lam0.25", "score", 1800, 0.6, lam=0.25, reg_score="logit"),
        _row("score-logit-lam0.075", "score", 2720, 0.12, lam=0.075, reg_score="logit"),
        _row("score-prob-lam0.075", "score", 2452, 0.08, lam=0.075, reg_score="prob", threads=2),
    )
    expected = {
        "scratch-lam0": None,
        "scratch-lam0.25": "scratch-lam0",
        "ft-lam0": None,
        "ft-lam2.5-lr0.001": "ft-lam0-lr0.001",
        "width1-lam0.75": "width1-lam0",
        "score-logit-lam0.075": None,
        "score-prob-lam0.075": "score-logit-lam0.075",
    }
    assert {name: tr.control_of(runs[name], runs) for name in expected} == expected
    # a setting (not a resource) that differs unpairs the twins: no control rather than the wrong one
    runs["score-prob-lam0.075"]["config"]["epochs"] = 9
    assert tr.control_of(runs["score-prob-lam0.075"], runs) is None
