"""Reports, rendered in one place: the Markdown tables, CSV and curve figure of an evaluation
(:func:`write_report`), the side-by-side comparison of docs/method.md §The reproduction table (:func:`compare_table`,
:func:`write_comparison`), and the Markdown reports of ``igrad reproduce`` and its ablation
(:func:`reproduce_markdown`, :func:`ablation_markdown`). Nothing here computes a number: the values come
from :mod:`igrad.evaluate` and :mod:`igrad.reproduce`.
"""

from __future__ import annotations

import io
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .evaluate import EvalConfig, compare_results
from .metrics import METRICS
from .provenance import provenance
from .train import RESOURCE_FIELDS, config_to_toml

__all__ = [
    "LABELS",
    "FINETUNED",
    "CONTROL",
    "finetuned_label",
    "FIGURE_METHODS",
    "results_table",
    "write_report",
    "compare_table",
    "write_comparison",
    "reproduce_markdown",
    "ablation_markdown",
]

#: The two models of a comparison: λ = 0 and λ > 0 (one word for each, everywhere).
LABELS = ("baseline", "regularised")
#: The optional third model of a reproduction: the baseline fine-tuned with ``L_R`` (its comparison with the
#: baseline reuses the two labels above, "regularised" being the fine-tuned model).
FINETUNED = "fine-tuned"
#: Its control: the same fine-tuning (same weights, steps, rate and seed) with λ = 0, so that the comparison
#: isolates ``L_R`` from the effect of training a few more epochs at a new rate.
CONTROL = "fine-tuned-control"


def finetuned_label(seed_index: int, seed: int, *, control: bool) -> str:
    """The label of a fine-tuned model (``control``: its λ = 0 control) trained with the ``seed_index``-th of
    the preset's fine-tuning seeds, ``seed``: the first seed's models are ``fine-tuned`` and
    ``fine-tuned-control``, a later seed's add ``-seed<seed>`` (``fine-tuned-seed1``)."""
    name = CONTROL if control else FINETUNED
    return name if seed_index == 0 else f"{name}-seed{seed}"


#: Columns of the qualitative figure after the image.
FIGURE_METHODS = ("gradient", "guided", "gradcam", "scorecam")


def _arrow(metric: str) -> str:
    return "↑" if METRICS[metric].higher_is_better else "↓"


def _cell(s: Mapping[str, Any], digits: int = 2) -> str:
    if s["ci_low"] is None:
        return f"{s['mean']:.{digits}f}"
    half = (s["ci_high"] - s["ci_low"]) / 2
    return f"{s['mean']:.{digits}f} ± {half:.{digits}f}"


def _header(results: Mapping[str, Any]) -> list[str]:
    d, st, mo = results["data"], results["settings"], results["model"]
    name = mo.get("name") or "model"
    lines = [
        f"Model `{name}` {mo.get('model_kwargs') or ''} · data `{d.get('source')}` {d.get('split', '')} · "
        f"N = {d['n']} images (seed {d['seed']}) · target: {'ground truth' if st['target'] == 'gt' else 'prediction'}"
        f" · step {st['step']} px ({st['n_steps']} steps)",
    ]
    acc = "n/a" if mo["accuracy"] is None else f"{100 * mo['accuracy']:.2f}% ({mo['accuracy_n']} images)"
    lines.append(f"Top-1 accuracy: {acc} · mean cos(δx, δᴳx): {_cell(mo['cos'], 4)}")
    return lines


def results_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: one row per method, one column per metric, ``mean ± half the 95% CI``."""
    metrics = results["settings"]["metrics"]
    head = "| method | " + " | ".join(f"{METRICS[k].title} {_arrow(k)}" for k in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = [f"| {m} | " + " | ".join(_cell(d[k]) for k in metrics) + " |" for m, d in results["results"].items()]
    return "\n".join([head, rule, *rows])


def _markdown(results: Mapping[str, Any]) -> str:
    ci = results["settings"]["ci"]
    return (
        "# igrad evaluate\n\n"
        + "\n\n".join(_header(results))
        + "\n\n"
        + results_table(results)
        + f"\n\nValues ×100; ± is half the 95% confidence interval ({ci}); ↑ higher is better, ↓ lower is better.\n"
    )


def _csv(results: Mapping[str, Any]) -> str:
    import csv
    import json

    buf = io.StringIO()
    prov = {k: results["provenance"].get(k) for k in ("commit", "time", "versions", "seed")}
    buf.write(f"# igrad evaluate results; provenance: {json.dumps(prov, default=str)}\n")
    buf.write(f"# checkpoint: {json.dumps(results.get('checkpoint'))}; data: {results['data'].get('source')}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "metric", "mean", "ci_low", "ci_high", "n", "higher_is_better"])
    mo = results["model"]
    if mo["accuracy"] is not None:
        writer.writerow(["(model)", "accuracy", mo["accuracy"], "", "", mo["accuracy_n"], True])
    cos = mo["cos"]
    writer.writerow(["(model)", "cos", cos["mean"], cos["ci_low"], cos["ci_high"], cos["n"], True])
    for m, d in results["results"].items():
        for k, s in d.items():
            writer.writerow([m, k, s["mean"], s["ci_low"], s["ci_high"], s["n"], METRICS[k].higher_is_better])
    return buf.getvalue()


def _plot(results: Mapping[str, Any]) -> bytes | None:
    curves = results["curves"]
    kinds = [k for k in ("ins", "del") if any(k in d for d in curves.values())]
    if not kinds:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(kinds), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, k in zip(axes, kinds, strict=True):
        for i, (m, d) in enumerate(curves.items()):
            if k in d:
                ys = d[k]
                xs = [j / (len(ys) - 1) for j in range(len(ys))]
                auc = results["results"][m][k]["mean"]
                style = "-" if i < 10 else "--"  # ten colours, then dashed
                ax.plot(xs, ys, style, color=f"C{i % 10}", label=f"{m} ({auc:.1f})")
        ax.set_title(f"{METRICS[k].title} ({'higher' if METRICS[k].higher_is_better else 'lower'} is better)")
        ax.set_xlabel("fraction of pixels " + ("inserted" if k == "ins" else "deleted"))
        ax.set_ylabel("mean class probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"N = {results['data']['n']} images")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``curves.png`` (when insertion or
    deletion was measured) into ``out_dir``, each atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "md": out / "results.md",
    }
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["csv"], _csv(results))
    atomic_write_text(paths["md"], _markdown(results))
    png = _plot(results)
    if png is not None:
        paths["png"] = out / "curves.png"
        atomic_write_bytes(paths["png"], png)
    return paths


def compare_table(
    baseline: Mapping[str, Any],
    regularised: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("baseline", "regularised"),
    ci: str = "normal",
) -> str:
    """The reproduction table (docs/method.md) side by side, in Markdown: accuracy and mean cos, then per method each
    metric for the
    baseline and regularised; the better value of each pair in bold, ``*`` where the paired 95% interval of
    the difference excludes 0 (same images; ``ci`` as in :func:`igrad.evaluate.compare_results`), ``†``
    where it stays significant after Holm's correction over the table's cells."""
    cmp = compare_results(baseline, regularised, ci=ci)
    lb, lo = labels

    def mark(value: str, side: str, entry: Mapping[str, Any]) -> str:
        if entry.get("better") == side:
            value = f"**{value}**"
            if entry.get("significant"):
                value += "\\*"
            if entry.get("holm_significant"):
                value += "†"
        return value

    lines = [f"| | {lb} | {lo} |", "|---|---:|---:|"]
    acc = cmp["model"]["accuracy"]
    if acc["baseline"] is not None and acc["regularised"] is not None:
        fmt = [f"{100 * acc['baseline']:.2f}", f"{100 * acc['regularised']:.2f}"]
        lines.append(f"| top-1 accuracy (%) | {mark(fmt[0], 'baseline', acc)} | {mark(fmt[1], 'regularised', acc)} |")
    cos = dict(cmp["model"]["cos"])
    d = cos.get("difference")
    if d is not None:
        cos["significant"] = d["ci_low"] is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
    cos_b, cos_o = f"{cos['baseline']:.4f}", f"{cos['regularised']:.4f}"
    lines.append(f"| mean cos(δx, δᴳx) | {mark(cos_b, 'baseline', cos)} | {mark(cos_o, 'regularised', cos)} |")
    metrics = [k for k in regularised["settings"]["metrics"] if k in baseline["settings"]["metrics"]]
    head = "| method | " + " | ".join(f"{METRICS[k].title} {_arrow(k)} {lb} | {METRICS[k].title} {lo}" for k in metrics)
    rows = [head + " |", "|---|" + "---:|---:|" * len(metrics)]
    for m, entries in cmp["methods"].items():
        cells = []
        for k in metrics:
            e = entries[k]
            cells += [mark(f"{e['baseline']:.2f}", "baseline", e), mark(f"{e['regularised']:.2f}", "regularised", e)]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    n_b, n_o = baseline["data"]["n"], regularised["data"]["n"]
    legend = (
        f"N = {n_b} ({lb}) and {n_o} ({lo}) images"
        + (", the same images" if cmp["paired"] else ", NOT the same images (no paired test)")
        + ". Bold: the better value of the pair (AD and deletion: lower is better); \\*: the paired 95% interval "
        "of the per-image difference excludes 0; †: still significant after Holm's correction over all the "
        "cells of this table (family-wise error 5%). Metric values ×100."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n\n" + legend + "\n"


def write_comparison(
    baseline: Mapping[str, Any],
    regularised: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    labels: tuple[str, str] = ("baseline", "regularised"),
    name: str = "compare",
    reports: bool = True,
) -> dict[str, Path]:
    """Write ``<name>.md`` + ``<name>.json`` into ``out_dir`` (the paired comparison,
    :func:`igrad.evaluate.compare_results`, whose keys call the second side ``"regularised"`` whatever its
    label) and, with ``reports``, each side's report into ``out_dir/<label>/``. Returns the paths written,
    keyed by file name (``"<label>.<file>"`` for the sides' files)."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for label, res in zip(labels, (baseline, regularised), strict=True):
        for k, p in (write_report(res, out / label) if reports else {}).items():
            paths[f"{label}.{k}"] = p
    md, js = f"{name}.md", f"{name}.json"
    paths[md] = out / md
    atomic_write_text(
        paths[md],
        "# igrad evaluate: comparison\n\n"
        + compare_table(baseline, regularised, labels=labels, ci=regularised["settings"]["ci"]),
    )
    paths[js] = out / js
    atomic_write_json(
        paths[js],
        {
            "kind": "igrad.compare",
            "labels": list(labels),
            "checkpoints": [baseline.get("checkpoint"), regularised.get("checkpoint")],
            "comparison": compare_results(baseline, regularised, ci=regularised["settings"]["ci"]),
            "provenance": provenance(None, regularised["data"]["seed"]),
        },
    )
    return paths


def _rel(path: str | Path, root: Path) -> str:
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _versions(prov: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in prov["versions"].items())


def _reproduce_header(report: Mapping[str, Any]) -> list[str]:
    ev = report["settings"]["evaluate"]
    return [
        f"# igrad reproduce: preset `{report['preset']}`",
        "",
        "The paper's claim (docs/method.md): the regularised models improve most interpretability metrics for two "
        "networks while staying within a small margin of the standard model's accuracy. Below, the baseline and "
        "the regularised model of each network, trained from the same seed with the same recipe, differ only in "
        "λ"
        + (
            "; the fine-tuned model starts from the baseline's final weights and trains a few epochs with L_R."
            if report["settings"].get("finetuned")
            else "."
        ),
        *(["", f"Scope: {report['scope']}"] if report.get("scope") else []),
        "",
        f"- command: `{report['command']}`",
        f"- data: `{report['data']}`; λ of the regularised model: {report['lam']:g}",
        f"- evaluation: {ev['limit'] or 'all'} test images (seed {ev['seed']}), the same for every model; "
        f"target = {'label' if ev['target'] == 'gt' else 'prediction'}; final weights (`last.pt`)",
        f"- wall time of this call: {_fmt_s(report['wall_time_s'])}",
        "",
    ]


def _accuracy_sentence(stats: Mapping[str, Any] | None, acc_b: float | None, acc_r: float | None) -> str:
    """Top-1 of both models with Wilson intervals and the difference with Newcombe's (when measured)."""
    if stats is None:
        if acc_b is None or acc_r is None:
            return "Top-1 accuracy not measured."
        return f"Top-1 accuracy {100 * acc_b:.2f}% → {100 * acc_r:.2f}% ({100 * (acc_r - acc_b):+.2f} points)."
    b, r, d = stats["baseline"], stats["regularised"], stats["difference"]
    return (
        f"Top-1 accuracy {100 * b['top1']:.2f}% [{100 * b['ci_low']:.2f}, {100 * b['ci_high']:.2f}] → "
        f"{100 * r['top1']:.2f}% [{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}] on {b['n']} test images "
        f"(Wilson 95%); difference {100 * d['mean']:+.2f} points [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] "
        "(Newcombe 95%, conservative for the same images)."
    )


def _versus_lines(
    name: str, versus: Mapping[str, Any], base: Mapping[str, Any], other: Mapping[str, Any], base_name: str = "baseline"
) -> list[str]:
    """The reproduction table (docs/method.md) of one model (``name``) against its reference (``base_name``: the
    baseline, or a
    fine-tuned model's control) and the sentence under it: cells won (raw, paired interval, Holm), accuracy
    with intervals, mean cos."""
    w = versus["wins"]
    return [
        versus["table"],
        f"{name[0].upper() + name[1:]} better in **{w['regularised']} of {w['cells']}** method × metric cells "
        f"({w['regularised_significant']} with a paired 95% interval excluding 0, **{w.get('regularised_holm', 0)} "
        f"after Holm's correction**); {base_name} better in {w['baseline']} ({w['baseline_significant']} "
        f"significant, {w.get('baseline_holm', 0)} after Holm); ties {w['tie']}. "
        + _accuracy_sentence(versus.get("accuracy"), base["accuracy"], other["accuracy"])
        + f" Mean cos(δx, δᴳx) {base['cos']['mean']:.4f} → {other['cos']['mean']:.4f}.",
        "",
    ]


def _fine_tuning_lines(net: str, entry: Mapping[str, Any]) -> list[str]:
    """The fine-tuned models of ``net``: each against its λ = 0 control (the first seed's first: the comparison
    that isolates ``L_R``), the seeds' agreement and noise, then the first against the baseline it started
    from. A network made before the controls existed gets the baseline comparison alone, and says so."""
    runs, ft = entry["runs"], entry.get(FINETUNED)
    tuning = entry.get("fine-tuning")
    lines: list[str] = []
    if tuning:
        for pair in tuning["pairs"]:
            seed = "" if pair["seed"] is None else f" (seed {pair['seed']})"
            lines += [
                f"### {net}: fine-tuned with λ = {tuning['lam']:g} against its λ = 0 control{seed}",
                "",
                "Both start from the baseline's final weights and train the same steps at the same rate with the "
                "same seed; they differ in λ alone, so this table is the effect of L_R.",
                "",
                *_versus_lines("fine-tuned", pair, runs[pair["control"]], runs[pair["model"]], "control"),
            ]
        for noise in tuning.get("seed_noise", []):
            lines += _seed_noise_lines(net, tuning, noise)
    if ft:
        lines += [
            f"### {net}: the baseline fine-tuned with λ = {ft['lam']:g}, against the baseline",
            "",
            (
                "A second view: this table mixes L_R's effect with that of training a few more epochs at a new "
                "rate (its control above separates them)."
                if tuning
                else "No λ = 0 control for this network (made before the controls existed): this table mixes "
                "L_R's effect with that of training a few more epochs at a new rate."
            ),
            "",
            *_versus_lines("fine-tuned", ft, runs["baseline"], runs[FINETUNED]),
        ]
    return lines


def _seed_noise_lines(net: str, tuning: Mapping[str, Any], noise: Mapping[str, Any]) -> list[str]:
    """The per-cell table of L_R's effect at two seeds beside the training's own noise (the two seeds' λ = 0
    controls, and fine-tuned models, compared), and the sentence that sums it up."""
    s0, s1 = noise["seeds"]
    first = next(p for p in tuning["pairs"] if p["seed"] == s0)
    later = next(p for p in tuning["pairs"] if p["seed"] == s1)

    def cell(e: Mapping[str, Any]) -> str:
        d = e["difference"]
        text = f"{100 * d['mean']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]"
        return f"**{text}**" if e.get("significant") else text

    lines = [
        f"### {net}: L_R's effect at two seeds, beside the training's own noise",
        "",
        f"| method | metric | effect, seed {s0} (fine-tuned − control) | effect, seed {s1} | "
        f"control: seed {s1} − seed {s0} | fine-tuned: seed {s1} − seed {s0} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, per in first["comparison"]["methods"].items():
        for k, e in per.items():
            cells = [e, later["comparison"]["methods"][method][k]]
            cells += [noise["control"]["methods"][method][k], noise["fine-tuned"]["methods"][method][k]]
            lines.append(f"| {method} | {METRICS[k].title} {_arrow(k)} | " + " | ".join(map(cell, cells)) + " |")
    sm = noise["summary"]
    return lines + [
        "",
        f"Mean per-image differences ×100 with paired 95% intervals; bold: the interval excludes 0. L_R's effect "
        f"has the same sign at both seeds in **{sm['same_sign']} of {sm['cells']}** cells, is significant at both "
        f"with the same sign in **{sm['replicated']}**, and exceeds, at both seeds, that cell's difference between "
        f"the two λ = 0 controls in **{sm['beyond_noise']}**. The controls, which differ in their seed alone, "
        f"differ by up to {100 * sm['noise_max']:.2f} (median {100 * sm['noise_median']:.2f}) and significantly in "
        f"{sm['noise_significant']} cells: a difference of that size between two models is the training's own "
        "noise, not an effect.",
        "",
    ]


def _weights_lines(entry: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
    """The committed weights of a network's models (file, SHA-256) and the command that re-evaluates one."""
    runs = {label: r for label, r in entry["runs"].items() if r.get("weights")}
    if not runs:
        return [
            "No weights were kept for this network's models: its cells cannot be re-checked without retraining.",
            "",
        ]
    ev = EvalConfig.from_dict({k: v for k, v in report["settings"]["evaluate"].items() if k != "device"})
    label, first = next(iter(runs.items()))
    path = first["weights"]["path"]
    command = shlex.join(
        [
            "igrad",
            "evaluate",
            "--checkpoint",
            path,
            "--data",
            str(report["data"]),
            *ev.flags(),
            "--out",
            f"recheck/{label}",
        ]
    )
    missing = [label for label in entry["runs"] if label not in runs]
    weights = {label: r["weights"] for label, r in runs.items()}
    return [
        "| model | weights (model state, float32) | bytes | SHA-256 |",
        "|---|---|---:|---|",
        *(f"| {lb} | `{w['path']}` | {w['bytes']} | `{w['sha256']}` |" for lb, w in weights.items()),
        "",
        f"Re-evaluating one gives its cells above (run from this report's folder): `{command}`"
        + (f". Without weights (their cells stand as measured): {', '.join(missing)}." if missing else "."),
        "",
    ]


def _network_section(net: str, entry: Mapping[str, Any], out: Path, report: Mapping[str, Any]) -> list[str]:
    """One network of the reproduction: its reproduction table (docs/method.md), the fine-tuned models'
    (:func:`_fine_tuning_lines`),
    the runs, the weights, curves and figure."""
    runs = entry["runs"]
    lines = [f"## {net}", "", *_made_by_lines(entry.get("made_by"))]
    lines += _versus_lines("regularised", entry, runs["baseline"], runs["regularised"])
    lines += _fine_tuning_lines(net, entry)
    lines += [
        "| model | λ | starts from | seed | epochs | steps | training time (with per-epoch tests) | evaluation time | "
        "run folder |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for label in runs:
        r = runs[label]
        start = "the baseline's final weights (fine-tuning)" if r["config"].get("init") else "scratch"
        lines.append(
            f"| {label} | {r['lam']:g} | {start} | {r['config'].get('seed', 0)} | {r['epochs']} | {r['steps']} | "
            f"{_fmt_s(r['train_s'])} | {_fmt_s(r['evaluation_s'])} | `{_rel(r['run_dir'], out)}` |"
        )
    curves = ", ".join(f"[{label}]({path})" for label, path in entry["curves"].items())
    return lines + [
        "",
        *_weights_lines(entry, report),
        f"Insertion/deletion curves: {curves}.",
        "",
        f"![qualitative figure, {net}]({entry['figure']['path']})",
        "",
        f"Qualitative figure: test images {entry['figure']['indices']} (evenly spaced through the evaluated subset); "
        "columns image, "
        + ", ".join(entry["figure"].get("methods", FIGURE_METHODS))
        + "; for each image one row per model: "
        + ", ".join(label for label in runs if label in (*LABELS, FINETUNED, CONTROL))
        + ".",
        "",
    ]


def _made_by_lines(made: Mapping[str, Any] | None) -> list[str]:
    """The line under a network's heading saying what made its entry: command, precision of training and
    evaluation, commit, machine and time (a report may hold networks made by different calls and machines)."""
    if not made:
        return []
    p, m = made["precision"], made.get("machine") or {}
    kinds = sorted(set(p["training"].values()))
    training = kinds[0] if len(kinds) == 1 else ", ".join(f"{k} {v}" for k, v in p["training"].items())
    bf16 = m.get("cpu_bf16_units")
    units = "" if bf16 is None else f", bf16 units: {'yes' if bf16 else 'no'}"
    cpu = m.get("cpu_model") or m.get("platform") or "?"
    where = f"{cpu} ({m.get('cpus')} CPUs{units})" + (f", GPU {m['cuda']}" if m.get("cuda") else "")
    who = (
        f"Carried from an earlier report written by `{made['command']}`"
        if made.get("from_report")
        else f"Made by `{made['command']}`"
    )
    return [
        f"{who}: training in **{training}**, saliency maps and metrics in **{p['evaluation']}** (top-1 and cos "
        f"in float32). That call: commit {made.get('commit')}, {where}, finished {made.get('time')} (it may "
        "have reused runs and evaluations, or carried this network from an earlier call; each run's training "
        "sessions, with their commits and machines, are in results.json where recorded).",
        "",
    ]


def _ablation_link(out: Path) -> list[str]:
    """A pointer to ``out/ablation/report.md`` and its choices, when the ablation has run."""
    ablation_json = out / "ablation" / "results.json"
    if not ablation_json.is_file():
        return []
    try:
        networks = json.loads(ablation_json.read_text(encoding="utf-8"))["networks"]
        chosen = {n: e["chosen"] for n, e in networks.items()}
    except (OSError, ValueError, KeyError):
        return []
    return [
        "## Ablation",
        "",
        f"See [ablation/report.md](ablation/report.md); chosen on the validation split: `{json.dumps(chosen)}`",
        "",
    ]


def _configuration_section(report: Mapping[str, Any]) -> list[str]:
    """The training config (the first network's baseline), the evaluation settings, machine and versions."""
    ev, prov = report["settings"]["evaluate"], report["provenance"]
    first_net = next(iter(report["networks"].values()), None)
    lines = [
        "## Configuration",
        "",
        "Training (the baseline's config, whose `preset` is the training recipe of `igrad.train.PRESETS` that "
        f"the experiment preset `{report['preset']}` builds on; the regularised run differs only in `lam` and `out`"
        + (
            f", and fine-tunes the baseline: `{json.dumps(report['settings']['finetune'])}`, `init`"
            if report["settings"].get("finetune")
            else ""
        )
        + (
            f"; the fine-tuned model starts from the baseline's final weights (`init`) with "
            f"`{json.dumps(report['settings']['finetuned'])}`"
            if report["settings"].get("finetuned")
            else ""
        )
        + f"; networks differ in {_differing_fields(report)}):",
        "",
    ]
    if first_net is not None:
        lines += ["```toml", config_to_toml(first_net["runs"]["baseline"]["config"]).rstrip(), "```", ""]
    lines += [
        "Evaluation (of this call; each network's precision is stated under its heading):",
        "",
        "```json",
        json.dumps(ev, indent=2),
        "```",
        "",
    ]
    return lines + [
        "## Machine and versions (of this call)",
        "",
        f"- versions: {_versions(prov)}",
        f"- commit: {prov.get('commit')}",
        f"- machine: {prov['machine'].get('platform')}, {prov['machine'].get('cpus')} CPUs, "
        f"{prov['machine'].get('torch_threads')} torch threads, GPU: {prov['machine'].get('cuda') or 'none'}",
        f"- finished: {prov.get('time')}",
        "",
        "Metric values ×100; AD and deletion: lower is better; the others higher. "
        f"Metrics: {', '.join(METRICS[k].title for k in METRICS)}.",
        "",
    ]


def _differing_fields(report: Mapping[str, Any]) -> str:
    """The config fields in which the networks' baselines differ (``model`` always), besides their paths and
    resources (:data:`igrad.train.RESOURCE_FIELDS`; the report's networks share their data folder)."""
    configs = [e["runs"]["baseline"]["config"] for e in report["networks"].values()]
    skip = RESOURCE_FIELDS | {"model", "data", "out", "init"}
    keys = sorted({k for c in configs for k in c if k not in skip and len({json.dumps(x.get(k)) for x in configs}) > 1})
    return ", ".join(f"`{k}`" for k in ["model", *keys])


def _summary_lines(
    title: str,
    name: str,
    versus: Mapping[str, Any],
    base: Mapping[str, Any],
    other: Mapping[str, Any],
    base_name: str = "baseline",
) -> list[str]:
    """:func:`terminal_summary`'s lines for one model (``name``) against its reference (``base_name``)."""
    w, acc = versus["wins"], versus.get("accuracy")
    if acc:
        d = acc["difference"]
        acc_text = (
            f"top-1 {100 * acc['baseline']['top1']:.1f}% → {100 * acc['regularised']['top1']:.1f}% "
            f"({100 * d['mean']:+.1f} points, 95% [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}])"
        )
    else:
        acc_text = "top-1 not measured"
    lines = [
        f"{title}: {acc_text}; cos(δx, δᴳx) {base['cos']['mean']:.3f} → {other['cos']['mean']:.3f}",
        f"  {name} better in {w['regularised']} of {w['cells']} cells ({w.get('regularised_holm', 0)} after "
        f"Holm), {base_name} in {w['baseline']} ({w.get('baseline_holm', 0)} after Holm)",
    ]
    methods = versus["comparison"]["methods"]
    metrics = list(next(iter(methods.values()))) if methods else []
    lines.append(f"  {'method':<12}" + "".join(f"{METRICS[k].title + ' ' + _arrow(k):>18}" for k in metrics))
    for m, per in methods.items():
        cells = []
        for k in metrics:
            e = per[k]
            cells.append(f"{e['baseline']:.1f} → {e['regularised']:.1f}{'†' if e.get('holm_significant') else ' '}")
        lines.append(f"  {m:<12}" + "".join(f"{c:>18}" for c in cells))
    return lines


def terminal_summary(report: Mapping[str, Any], out: Path) -> str:
    """A short plain-text summary of :func:`igrad.reproduce.reproduce` for the terminal: per network (and per
    regularised model: the regularised one, and the fine-tuned one where there is one) the accuracy and cos
    against the baseline, the cells won (raw, interval, Holm), every metric cell as
    ``baseline → regularised`` (``†``: clearly different after Holm), and where the report and figures are."""
    lines = []
    for net, entry in report["networks"].items():
        runs = entry["runs"]
        lines += _summary_lines(net, "regularised", entry, runs["baseline"], runs["regularised"])
        for pair in entry.get("fine-tuning", {}).get("pairs", []):
            seed = "" if pair["seed"] is None else f", seed {pair['seed']}"
            name = f"{net}, fine-tuned λ = {entry['fine-tuning']['lam']:g} vs its λ = 0 control{seed}"
            lines += _summary_lines(name, "fine-tuned", pair, runs[pair["control"]], runs[pair["model"]], "control")
        if FINETUNED in entry:
            ft = entry[FINETUNED]
            name = f"{net}, fine-tuned λ = {ft['lam']:g} vs the baseline"
            lines += _summary_lines(name, "fine-tuned", ft, runs["baseline"], runs[FINETUNED])
        lines.append(f"  figure: {out / entry['figure']['path']}")
    lines += [
        "(values ×100; † clearly different after Holm's correction over the network's cells)",
        f"report: {out / 'report.md'}",
    ]
    return "\n".join(lines)


def reproduce_markdown(report: Mapping[str, Any], out: Path) -> str:
    """``report.md`` of :func:`igrad.reproduce.reproduce`: the claim, per network its reproduction table
    (docs/method.md) and
    figure, the ablation's choice (when run), the configuration, machine and versions."""
    lines = _reproduce_header(report)
    for net, entry in report["networks"].items():
        lines += _network_section(net, entry, out, report)
    lines += _ablation_link(out)
    lines += _configuration_section(report)
    return "\n".join(lines)


def _ablation_mark(entry: Mapping[str, Any] | None) -> str:
    """`` +``/`` −`` for a metric clearly better/worse than λ = 0 (paired interval excluding 0)."""
    if not entry or not entry.get("significant"):
        return ""
    return " +" if entry["better"] == "regularised" else " −"


def ablation_markdown(report: Mapping[str, Any]) -> str:
    """``ablation/report.md`` of :func:`igrad.reproduce.ablation`: per network the λ × error table on the
    validation split and the setting chosen."""
    s = report["settings"]
    t = s["train"]
    lines = [
        f"# igrad reproduce --ablation: preset `{report['preset']}`",
        "",
        f"- command: `{report['command']}`",
        f"- budget per run: recipe `{s['recipe']}` with {json.dumps(t)}",
        f"- measured on the validation split (val_fraction {t['val_fraction']} of the training set, "
        f"{s['evaluate']['limit']} images for Grad-CAM's metrics), never on the test subset of the main table",
        f"- choice: among λ > 0 within {100 * report['acc_margin']:.0f} accuracy points of λ = 0, the setting "
        "with the most Grad-CAM metrics clearly better than λ = 0 (paired 95% interval excluding 0), then the "
        "most better at all (ties: validation accuracy, then cos)",
        "- a cell marked + (−) is clearly better (worse) than λ = 0 on the same images",
        f"- wall time of this call: {_fmt_s(report['wall_time_s'])}",
        "",
    ]
    metrics = list(s["evaluate"]["metrics"]) if not isinstance(s["evaluate"]["metrics"], str) else None
    for net, entry in report["networks"].items():
        rows = entry["rows"]
        keys = metrics or list(rows[0]["gradcam"])
        arrows = {k: "↑" if METRICS[k].higher_is_better else "↓" for k in keys}
        lines += [
            f"## {net}",
            "",
            "| λ | error | val acc (%) | val mean cos | "
            + " | ".join(f"Grad-CAM {METRICS[k].title} {arrows[k]}" for k in keys)
            + " | test acc (%) |",
            "|---:|---|---:|---:|" + "---:|" * len(keys) + "---:|",
        ]
        for r in rows:
            vs = r.get("vs_baseline", {})
            cells = " | ".join(f"{r['gradcam'][k]['mean']:.2f}" + _ablation_mark(vs.get(k)) for k in keys)
            lines.append(
                f"| {r['lam']:g} | {r['error'] or '-'} | {100 * r['val_acc']:.2f} | {r['val_cos']:.4f} | {cells} | "
                f"{100 * r['test_acc']:.2f} |"
            )
        c = entry["chosen"]
        lines += ["", f"Chosen on the validation split: {json.dumps(c)}", ""]
    prov = report["provenance"]
    lines += [
        f"Versions: {_versions(prov)}; commit {prov.get('commit')}; "
        f"{prov['machine'].get('platform')}, {prov['machine'].get('cpus')} CPUs; {prov.get('time')}.",
        "",
        "Metric values ×100; test accuracy is shown for information only (not used for the choice).",
        "",
    ]
    return "\n".join(lines)
