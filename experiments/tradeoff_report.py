"""The report of the trade-off study: ``report.md``, ``results.json`` and ``front.png`` from the
per-run files that ``experiments/tradeoff.py`` writes, whatever subset of the runs has finished.

    python experiments/tradeoff_report.py results/tradeoff

Every number is on the validation split (10 % of the training set, never the test set), except the
``baseline`` group's test top-1, which is the preset's accuracy target and is used for nothing.
Per run: validation top-1 (all validation images) with Wilson's 95 % interval, eval-mode cos(δx, δᴳx) and
each saliency method's AD/AG/AI/insertion/deletion on the same 500 validation images, with the paired
95 % interval of the per-image difference against the run's control (the λ = 0 run of the same budget:
``scratch-lam0`` for the runs from scratch, ``ft-lam0`` at the same rate for fine-tuning, the λ = 0 run of
the same width; for the probability-score ablation, its logit twin of the same λ and recipe) and the count of
cells clearly better/worse after Holm's correction over the run's cells.

**The choice rule** (fixed before any regularised run finished, applied mechanically): among the runs from
scratch at the study budget (groups ``scratch`` and ``warmup``), λ* is the one with the largest validation
cos(δx, δᴳx) whose validation top-1 is at least that of ``scratch-lam0`` minus 1 point.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from igrad.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from igrad.evaluate import compare_results
from igrad.metrics import METRICS
from igrad.provenance import provenance
from igrad.stats import difference_interval, wilson_interval
from igrad.train import RESOURCE_FIELDS

#: Tolerance of the choice rule: accuracy within this many points of the λ = 0 run.
ACCURACY_SLACK = 0.01
#: The study's first fine-tuning rate (experiments/tradeoff.py --ft-lr); points at another rate say theirs.
FT_LR = 0.01
GROUP_ORDER = ("baseline", "scratch", "warmup", "score", "finetune", "width")
MARKERS = {"baseline": "*", "scratch": "o", "warmup": "^", "score": "x", "finetune": "s", "width": "D"}


def load_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """Every finished run's results file in ``folder`` (the report's own files left out)."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "results.json":
            continue
        row = json.loads(path.read_text())
        if "evaluation" in row and "run" in row:
            runs[row["run"]] = row
    return runs


def control_of(row: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str | None:
    """The run a run is compared with: the λ = 0 run of its budget, for the score ablation its logit twin
    (``None`` for the controls themselves and the baseline)."""
    c, group = row["config"], row["group"]
    if c["lam"] == 0 or group == "baseline":
        return None
    if group == "finetune":
        name = _first(runs, lambda v: v["group"] == group and v["config"]["lam"] == 0 and v["config"]["lr"] == c["lr"])
    elif group == "score":  # the ablation: the probability against its logit twin (same λ and recipe)
        if c.get("reg_score", "logit") == "logit":
            return None
        name = _first(
            runs,
            lambda v: (
                v["group"] == group
                and v["config"].get("reg_score", "logit") == "logit"
                and _recipe(v["config"]) == _recipe(c)
            ),
        )
    elif group == "width":
        name = _first(
            runs, lambda v: v["group"] == group and v["config"]["lam"] == 0 and v["config"]["width"] == c["width"]
        )
    else:
        name = "scratch-lam0"
    return name if name in runs else None


def _first(runs: dict[str, dict[str, Any]], match: Callable[[dict[str, Any]], bool]) -> str | None:
    """The name of the first run whose row ``match`` accepts."""
    return next((name for name, row in runs.items() if match(row)), None)


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without its paths (output folder, data), score and resource fields
    (:data:`igrad.train.RESOURCE_FIELDS`): what two ablation twins share."""
    return {k: v for k, v in config.items() if k not in RESOURCE_FIELDS | {"out", "data", "reg_score"}}


def accuracy(row: dict[str, Any]) -> dict[str, Any]:
    """Validation top-1 over all validation images with Wilson's 95 % interval."""
    n = int(row["evaluation"]["data"]["n_total"])
    k = round(row["val_acc"] * n)
    lo, hi = wilson_interval(k, n)
    return {"top1": row["val_acc"], "ci_low": lo, "ci_high": hi, "n": n}


def _correct(acc: dict[str, Any]) -> int:
    """The number of correctly classified validation images behind :func:`accuracy`'s top-1."""
    return round(acc["top1"] * acc["n"])


def comparison(row: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """Paired differences against the control (Holm's correction over the run's cells: compare_results)."""
    cmp = compare_results(control["evaluation"], row["evaluation"])
    if not cmp["paired"]:
        raise SystemExit(f"{row['run']} and {control['run']} were evaluated on different images")
    cells = [e for d in cmp["methods"].values() for e in d.values()]
    better = sum(bool(e.get("holm_significant")) and e["better"] == "regularised" for e in cells)
    worse = sum(bool(e.get("holm_significant")) and e["better"] == "baseline" for e in cells)
    cmp["holm"] = {"cells": len(cells), "better": better, "worse": worse}
    a, b = accuracy(control), accuracy(row)
    d, lo, hi = difference_interval(_correct(a), a["n"], _correct(b), b["n"])
    cmp["accuracy_difference"] = {"mean": d, "ci_low": lo, "ci_high": hi}
    return cmp


def describe(row: dict[str, Any]) -> str:
    c = row["config"]
    parts = [f"λ {c['lam']:g}"]
    if c.get("lam_warmup"):
        parts.append(f"warm-up {c['lam_warmup']:g} ep")
    if c.get("reg_score", "logit") != "logit":
        parts.append(f"score {c['reg_score']}")
    if c.get("init"):
        parts.append(f"fine-tune lr {c['lr']:g}")
    parts.append(f"width {c['width'] or 1:g}, {c['epochs']} ep")
    if not c.get("amp", True):
        parts.append("fp32")
    return ", ".join(parts)


def choose(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The choice rule of the module docstring."""
    if "scratch-lam0" not in runs:
        return {"lam": None, "why": "scratch-lam0 has not finished"}
    control = accuracy(runs["scratch-lam0"])
    # in image counts, exactly: a run right at the floor qualifies (no float rounding of k/n − 0.01)
    floor_count = _correct(control) - math.floor(ACCURACY_SLACK * control["n"] + 1e-9)  # never more lenient
    floor = floor_count / control["n"]
    candidates = [r for r in runs.values() if r["group"] in ("scratch", "warmup")]
    accs = {r["run"]: accuracy(r) for r in candidates}
    for name, acc in accs.items():
        if acc["n"] != control["n"]:
            raise SystemExit(f"{name} was validated on {acc['n']} images, scratch-lam0 on {control['n']}")
    eligible = [r for r in candidates if _correct(accs[r["run"]]) >= floor_count]
    best = max(eligible, key=lambda r: r["evaluation"]["model"]["cos"]["mean"])
    return {
        "run": best["run"],
        "lam": best["config"]["lam"],
        "lam_warmup": best["config"].get("lam_warmup", 0.0),
        "val_acc": best["val_acc"],
        "val_cos": best["evaluation"]["model"]["cos"]["mean"],
        "accuracy_floor": floor,
        "candidates": sorted(r["run"] for r in candidates),
    }


def _fmt_diff(e: dict[str, Any]) -> str:
    d = e.get("difference")
    if d is None:
        return f"{e['regularised']:.2f}"
    mark = "**" if e.get("holm_significant") else ""
    return f"{mark}{e['regularised']:.2f} ({d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]){mark}"


def markdown(runs: dict[str, dict[str, Any]], table: list[dict[str, Any]], choice: dict[str, Any]) -> str:
    any_row = next(iter(runs.values()))
    ev = any_row["evaluation"]
    methods = list(ev["results"])
    metrics = list(ev["metrics"])
    prov = provenance(None, None)
    lines = [
        "# Trade-off study: accuracy against interpretability",
        "",
        f"CIFAR ResNet-18, real CIFAR-100, preset `{any_row['recipe']}`; {len(runs)} runs finished. Validation = "
        f"{ev['data']['n_total']} images held out of the training set (10 %, per class, seeded); cos and the "
        f"saliency metrics on the same {ev['data']['n']} of them (seeded) for every run. Generated by "
        "`python experiments/tradeoff_report.py results/tradeoff` from the per-run files beside this one "
        "(each with its config and provenance); report commit "
        f"{str(prov.get('commit'))[:12]}.",
        "",
        "## The choice rule (stated before the study's regularised runs finished)",
        "",
        "Among the runs from scratch at the study budget (λ curve and λ warm-up), take the one with the largest "
        "validation cos(δx, δᴳx) whose validation top-1 is at least λ = 0's minus 1 point.",
        "",
    ]
    if choice.get("lam") is None:
        lines.append(f"Not yet applied: {choice['why']}.")
    else:
        lines.append(
            f"**Result: {choice['run']}** (λ = {choice['lam']:g}, warm-up {choice['lam_warmup']:g} epochs): "
            f"validation top-1 {choice['val_acc']:.2%} (floor {choice['accuracy_floor']:.2%}), cos "
            f"{choice['val_cos']:.3f}; candidates finished so far: {', '.join(choice['candidates'])} (the report "
            "applies the rule anew to whatever has finished). The choice is made at a third of the preset's budget "
            "and used for the preset's full one."
        )
    lines += ["", "## Runs", ""]
    lines.append(
        "Top-1: validation, Wilson 95 % interval; Δ: against the control (λ = 0 of the same budget; for the score "
        "ablation its logit twin), Newcombe 95 % interval (conservative: both models see the same images). "
        "Metric cells: value (paired difference vs the control [95 % interval]); **bold**: clearly different "
        "after Holm's correction over the run's cells. ↑/↓: higher/lower is better."
    )
    lines.append("")
    head = ["run", "setting", "top-1 [95 %]", "Δ top-1", "cos", "Holm better/worse"]
    head += [f"{m} {METRICS[k].title} {'↑' if METRICS[k].higher_is_better else '↓'}" for m in methods for k in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        row, cmp = runs[t["run"]], t.get("comparison")
        acc = t["accuracy"]
        cells = [t["run"], describe(row), f"{acc['top1']:.2%} [{acc['ci_low']:.1%}, {acc['ci_high']:.1%}]"]
        if cmp:
            d = cmp["accuracy_difference"]
            cells.append(f"{d['mean'] * 100:+.1f} [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}]")
        else:
            is_twin = row["group"] == "score" and row["config"].get("reg_score", "logit") == "logit"
            cells.append("control" if row["config"]["lam"] == 0 or is_twin else "—")
        cells.append(f"{t['cos']:.3f}")
        cells.append(f"{cmp['holm']['better']}/{cmp['holm']['worse']} of {cmp['holm']['cells']}" if cmp else "—")
        for m in methods:
            for k in metrics:
                if cmp and m in cmp["methods"] and k in cmp["methods"][m]:
                    cells.append(_fmt_diff(cmp["methods"][m][k]))
                else:
                    cells.append(f"{row['evaluation']['results'][m][k]['mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reading the metric cells: insertion, deletion, AD and AG are measured on the model's softmax probability "
        "of the class, so a model that is less accurate and less confident scores lower insertion and lower "
        "(better) deletion whatever its maps show; differences between runs of very different accuracy say more "
        "about the model than about its explanations. Compare runs at similar accuracy (the choice rule's "
        "purpose), or AI, which counts images and is less tied to the probability's scale.",
    ]
    base = runs.get("baseline-lam0")
    if base is not None:
        lines += [
            "",
            "## The preset's baseline",
            "",
            f"`baseline-lam0` ({describe(base)}, trained on the 45,000 training images left after the split): "
            f"test top-1 **{base['test_acc']:.2%}** on the 10,000 CIFAR-100 test images (target ≥ 60 %), validation "
            f"{base['val_acc']:.2%}; training wall time {base['wall_s']['train'] / 60:.0f} min on one thread "
            "(the other core ran another study run).",
        ]
    lines += ["", *_provenance_lines(runs), "", "![front](front.png)", ""]
    return "\n".join(lines)


def _provenance_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The provenance section: where each run's config, seed, versions and commit are, and the runs recorded
    with uncommitted changes in the tree (``+dirty``), pointing to the notes that say what those were."""
    dirty = {}
    for n, r in runs.items():
        commits = [r["provenance"]["commit"], *(x.get("commit") for x in r.get("sessions", []))]
        marked = [str(c) for c in commits if "+dirty" in str(c)]
        if marked:
            dirty[n] = marked[0]
    lines = [
        "## Provenance",
        "",
        "Each run's file (`<run>.json`) records its config, seed, library versions, machine and a commit: for "
        "the files written before `sessions` existed, the tree's when the run ended; since, the commit igrad "
        "was imported from, and `sessions`, every process that trained the run with its own commit. `logs/` "
        "holds the per-epoch logs of the runs trained since they were kept.",
    ]
    if dirty:
        listed = ", ".join(f"`{n}` ({c[:7]})" for n, c in sorted(dirty.items()))
        lines[-1] += (
            f" Recorded with uncommitted changes in the tree (`+dirty`): {listed}; what those changes were, and "
            "why they do not touch what these runs computed, is in [provenance-notes.md](provenance-notes.md)."
        )
    return lines


def figure(runs: dict[str, dict[str, Any]], table: list[dict[str, Any]]) -> bytes:
    """The front: validation top-1 against cos and against Grad-CAM's and the gradient's deletion and insertion
    (and the gradient's AD), one point per run, a marker per group; the baseline drawn on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 9.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    panels = [
        (None, "cos", "eval-mode cos(δx, δᴳx)"),
        ("gradcam", "del", "Grad-CAM deletion AUC (lower is better)"),
        ("gradcam", "ins", "Grad-CAM insertion AUC (higher is better)"),
        ("gradient", "ad", "gradient AD (lower is better)"),
        ("gradient", "del", "gradient deletion AUC (lower is better)"),
        ("gradient", "ins", "gradient insertion AUC (higher is better)"),
    ]
    for ax, (method, key, label) in zip(axes, panels, strict=True):
        for group in GROUP_ORDER:
            pts = [t for t in table if runs[t["run"]]["group"] == group]
            if not pts:
                continue
            xs = [t["cos"] if method is None else _mean(runs[t["run"]], method, key) for t in pts]
            ys = [t["accuracy"]["top1"] * 100 for t in pts]
            top = group == "baseline"  # hidden under the fine-tuned points, which start from it
            outline = {"edgecolors": "black"} if top else {}
            ax.scatter(
                xs,
                ys,
                marker=MARKERS[group],
                s=160 if top else 60,
                label=group,
                zorder=3 if top else 2,
                alpha=1 if top else 0.8,
                **outline,
            )
            for i, (x, y, t) in enumerate(zip(xs, ys, pts, strict=True)):
                c = runs[t["run"]]["config"]
                tag = f"{c['lam']:g}" + (f"/w{c['width']:g}" if group == "width" else "")
                tag += f"/lr{c['lr']:g}" if group == "finetune" and c["lr"] != FT_LR else ""
                # the fine-tuned runs crowd near the baseline: their tags go left, staggered
                offset = (-6, -10 + 6 * (i % 4)) if group == "finetune" else (4, 3)
                ha = "right" if group == "finetune" else "left"
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=offset, fontsize=6.5, ha=ha)
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", title="group (labels: λ)")
    fig.suptitle("ResNet-18 on CIFAR-100 validation: one point per run (saliency metrics ×100, the same 500 images)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _mean(row: dict[str, Any], method: str, metric: str) -> float:
    """A run's mean of ``metric`` for ``method`` on the study's validation images."""
    return float(row["evaluation"]["results"][method][metric]["mean"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the folder of the per-run results files")
    args = ap.parse_args()
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"no finished runs in {args.folder}")
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    table = []
    for name, row in sorted(
        runs.items(),
        key=lambda kv: (
            order.get(kv[1]["group"], 9),
            kv[1]["config"]["width"] or 1,
            kv[1]["config"]["lr"],
            kv[1]["config"]["lam"],
            kv[0],
        ),
    ):
        control = control_of(row, runs)
        table.append(
            {
                "run": name,
                "group": row["group"],
                "config": row["config"],
                "accuracy": accuracy(row),
                "cos": row["evaluation"]["model"]["cos"]["mean"],
                "control": control,
                "comparison": comparison(row, runs[control]) if control else None,
            }
        )
    choice = choose(runs)
    atomic_write_json(
        args.folder / "results.json",
        {
            "kind": "igrad-tradeoff-study",
            "choice_rule": "largest validation cos among scratch/warm-up runs with validation top-1 >= λ=0's - 1 point",
            "choice": choice,
            "runs": table,
            "provenance": provenance(None, None),
        },
    )
    atomic_write_text(args.folder / "report.md", markdown(runs, table, choice))
    atomic_write_bytes(args.folder / "front.png", figure(runs, table))
    print(f"{len(runs)} runs; choice: {choice}")


if __name__ == "__main__":
    main()
