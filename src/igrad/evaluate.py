"""Evaluation of saliency methods on a trained classifier: the tables of SPEC 5.

:func:`evaluate_model` runs every requested saliency method (:mod:`igrad.saliency`) and metric
(:mod:`igrad.metrics`) over a fixed, seeded subset of a data split, together with the model's top-1
accuracy and the mean ``cos(δx, δᴳx)`` diagnostic, and returns a JSON-ready dict;
:func:`evaluate_checkpoint` does the same from a checkpoint file. :func:`write_report` writes
``results.json``, ``results.csv``, ``results.md`` and ``curves.png``; :func:`compare_table` and
:func:`write_comparison` put a baseline and a regularised model side by side, the better value of
each cell marked (AD and deletion: lower is better).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import os
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import normalize
from .errors import IgradError, unknown_name
from .gradients import gradient_cosine
from .measure import evaluate_accuracy
from .metrics import METRICS, compute_metrics, resolve_metrics, summarize
from .normalization import Normalization
from .output import model_logits
from .provenance import atomic_write_bytes, atomic_write_json, atomic_write_text, provenance
from .rules import eval_mode

__all__ = [
    "TARGETS",
    "select_indices",
    "resolve_methods",
    "evaluate_model",
    "evaluate_checkpoint",
    "write_report",
    "results_table",
    "compare_results",
    "compare_table",
    "write_comparison",
]

RESULTS_FORMAT = 1
#: Target class choices: ``gt`` the ground-truth label (SPEC 3 decision), ``pred`` the predicted class.
TARGETS = ("gt", "pred")


def select_indices(n_total: int, limit: int | None, seed: int) -> torch.Tensor:
    """The evaluated subset: all ``n_total`` indices, or the first ``limit`` of a permutation seeded
    by ``seed`` (sorted). A smaller ``limit`` with the same seed gives a subset of a larger one."""
    if limit is None:
        return torch.arange(n_total)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise IgradError(f"limit must be a positive number of images, got {limit!r}")
    if limit > n_total:
        raise IgradError(f"limit {limit} is larger than the data ({n_total} images)")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:limit].sort().values


def resolve_methods(spec: str | Iterable[str]) -> list[str]:
    """Saliency method names from ``"all"``, a comma-separated string or a sequence (registry of
    :mod:`igrad.saliency`); unknown names raise."""
    from .saliency import METHODS

    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(METHODS)
    if not names:
        raise IgradError(f"no saliency method given; choose from {', '.join(METHODS)} or 'all'")
    out: list[str] = []
    for n in names:
        if n not in METHODS:
            raise unknown_name("saliency method", n, METHODS)
        if n not in out:
            out.append(n)
    return out


def _seed_for(seed: int, method: str, chunk: int) -> int:
    """A seed per (run seed, method, chunk), so a method's numbers do not depend on the others run."""
    return (int(seed) * 1_000_003 + zlib.crc32(method.encode()) * 1009 + chunk) % (2**31 - 1)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate_model(
    model: nn.Module,
    split: Any,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    methods: str | Iterable[str] = "all",
    metrics: str | Iterable[str] = "all",
    limit: int | None = None,
    seed: int = 0,
    target: str = "gt",
    batch_size: int = 64,
    step: int | None = None,
    target_layer: str | None = None,
    ci: str = "normal",
    accuracy: bool = True,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    source: str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate saliency ``methods`` with ``metrics`` on ``split`` (an :class:`igrad.data.Split` whose
    labels are the model's class indices: :func:`igrad.data.match_classes` renumbers a folder's).

    Images are the seeded subset :func:`select_indices` ``(len(split), limit, seed)``, normalised with
    ``mean``/``std``, processed ``batch_size`` at a time (saliency maps, then metrics whose forwards
    are packed ``batch_size`` images at a time), on the model's device. Target class: the label
    (``target="gt"``) or the prediction (``"pred"``). Each metric is summarised by :func:`summarize`
    (mean, ``ci`` 95% interval, N); the mean insertion/deletion curves are kept for plotting and
    per-sample values for paired comparisons. With ``accuracy=True`` the top-1 accuracy is measured
    on the whole split; ``cos(δx, δᴳx)`` (:func:`igrad.gradient_cosine`) on the subset.
    """
    from .saliency import METHODS, create_method

    method_names = resolve_methods(methods)
    metric_names = resolve_metrics(metrics)
    if target not in TARGETS:
        raise unknown_name("target", str(target), TARGETS)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IgradError(f"batch_size must be a positive integer, got {batch_size!r}")
    if ci not in ("normal", "bootstrap"):
        raise unknown_name("confidence interval", str(ci), ("normal", "bootstrap"))
    if len(split) == 0:
        raise IgradError("the data split is empty")
    indices = select_indices(len(split), limit, seed)
    device = _device_of(model)
    c = split.images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    if mean_t.numel() != c or std_t.numel() != c:
        raise IgradError(f"mean and std need one value per channel ({c}), got {mean_t.numel()} and {std_t.numel()}")
    kwargs: dict[str, dict[str, Any]] = {}
    for name in method_names:
        accepted = inspect.signature(METHODS[name]).parameters
        kw: dict[str, Any] = {k: v for k, v in (("batch_size", batch_size), ("progress", False)) if k in accepted}
        if target_layer is not None and getattr(METHODS[name], "uses_layer", True):
            kw["target_layer"] = target_layer
        kwargs[name] = {**kw, **(method_kwargs or {}).get(name, {})}

    started = time.perf_counter()
    acc = (
        evaluate_accuracy(model, split, Normalization.of(mean, std), batch_size=batch_size * 4, device=device)
        if accuracy
        else None
    )
    per_sample: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in metric_names} for m in method_names}
    curve_sums: dict[str, dict[str, torch.Tensor]] = {m: {} for m in method_names}
    seconds = {m: {"saliency": 0.0, "metrics": 0.0} for m in method_names}
    cos_parts: list[torch.Tensor] = []
    subset_correct = 0
    targets_used: list[torch.Tensor] = []

    from tqdm.auto import tqdm

    total = len(indices) * len(method_names)
    bar = tqdm(total=total, unit="img", desc="evaluate", disable=not progress, dynamic_ncols=True)
    with bar, eval_mode(model):
        for chunk, lo in enumerate(range(0, len(indices), batch_size)):
            idx = indices[lo : lo + batch_size]
            x = normalize(split.images[idx].to(device), mean, std)
            labels = split.labels[idx].to(device)
            with torch.no_grad():  # not inference_mode: the targets feed autograd below
                pred = model_logits(model, x).argmax(1)
            subset_correct += int((pred == labels).sum())
            tgt = labels if target == "gt" else pred
            targets_used.append(tgt.cpu())
            cos_parts.append(gradient_cosine(model, x, tgt).detach().float().cpu())
            for name in method_names:
                bar.set_postfix_str(name, refresh=False)
                t0 = time.perf_counter()
                kw = kwargs[name]
                run_seed = _seed_for(seed, name, chunk)
                if "seed" in inspect.signature(METHODS[name]).parameters and "seed" not in kw:
                    kw = {**kw, "seed": run_seed}
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(run_seed)
                    with create_method(name, model, **kw) as m:
                        maps = m(x, tgt)
                t1 = time.perf_counter()
                try:
                    res = compute_metrics(
                        model, x, maps.detach(), tgt, metric_names, mean=mean, std=std, step=step, batch_size=batch_size
                    )
                except IgradError as exc:
                    raise IgradError(f"method {name!r}: {exc}") from exc
                seconds[name]["saliency"] += t1 - t0
                seconds[name]["metrics"] += time.perf_counter() - t1
                for k, v in res.values.items():
                    per_sample[name][k].append(v)
                for k, cv in res.curves.items():
                    curve_sums[name][k] = curve_sums[name].get(k, 0) + cv.double().sum(0)
                bar.update(len(idx))

    n = len(indices)
    cos = torch.cat(cos_parts)
    values = {m: {k: torch.cat(v) for k, v in d.items()} for m, d in per_sample.items()}
    h, w = split.images.shape[-2:]
    step_px = w if step is None else step
    results = {
        "kind": "igrad.evaluate",
        "format": RESULTS_FORMAT,
        "model": {
            "name": (config or {}).get("model"),
            "model_kwargs": (config or {}).get("model_kwargs"),
            "accuracy": acc,
            "accuracy_n": len(split) if accuracy else None,
            "subset_accuracy": subset_correct / n,
            "cos": summarize(cos, ci=ci, seed=seed),
        },
        "data": {
            "source": source,
            "n_total": len(split),
            "n": n,
            "limit": limit,
            "seed": seed,
            "image_size": [int(h), int(w)],
            "indices": indices.tolist(),
        },
        "settings": {
            "methods": method_names,
            "metrics": metric_names,
            "target": target,
            "target_layer": target_layer,
            "step": step_px,
            "n_steps": math.ceil(h * w / step_px),
            "insertion_substrate": "blur",
            "deletion_substrate": "zero",
            "score": "prob",
            "batch_size": batch_size,
            "ci": ci,
            "ci_level": 0.95,
            "mean": list(map(float, mean_t.flatten().tolist())),
            "std": list(map(float, std_t.flatten().tolist())),
        },
        "metrics": {
            k: {"title": METRICS[k].title, "higher_is_better": METRICS[k].higher_is_better} for k in metric_names
        },
        "results": {m: {k: summarize(v, ci=ci, seed=seed) for k, v in d.items()} for m, d in values.items()},
        "curves": {m: {k: (s / n).tolist() for k, s in d.items()} for m, d in curve_sums.items()},
        "per_sample": {
            "target": torch.cat(targets_used).tolist(),
            "cos": cos.tolist(),
            "methods": {m: {k: v.tolist() for k, v in d.items()} for m, d in values.items()},
        },
        "timing": {"total_s": time.perf_counter() - started, "method_s": seconds, "device": str(device)},
        "provenance": provenance(config, seed),
    }
    return results


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_model` for a checkpoint (:func:`igrad.checkpoint.load_model`): the model, its
    normalisation (``config["mean"]``/``["std"]``) and, unless ``data`` is given, ``config["data"]``.
    The data's labels are matched to the checkpoint's classes by name (:func:`igrad.data.match_classes`),
    so ``data`` may hold any subset of them."""
    from .checkpoint import load_model
    from .data import load_split, match_classes

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config = load_model(checkpoint, map_location=device)
    source = data if data is not None else config.get("data")
    if source is None:
        raise IgradError(f"checkpoint {checkpoint} does not name its data set; pass --data")
    if "mean" not in config or "std" not in config:
        raise IgradError(f"checkpoint {checkpoint} config lacks the normalisation (mean, std)")
    data_split = match_classes(
        load_split(source, split),
        config.get("classes"),
        int(config["num_classes"]),
        source=f"the {split} split of {source}",
        model=f"checkpoint {checkpoint}",
    )
    results = evaluate_model(
        model, data_split, mean=config["mean"], std=config["std"], config=config, source=str(source), **kwargs
    )
    results["data"]["split"] = split
    results["checkpoint"] = {"path": str(checkpoint), "sha256": _sha256(Path(checkpoint))}
    return results


# --------------------------------------------------------------------------------------------------
# reports


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


# --------------------------------------------------------------------------------------------------
# baseline vs ours


def compare_results(baseline: Mapping[str, Any], ours: Mapping[str, Any], *, ci: str = "normal") -> dict[str, Any]:
    """Per method and metric: both means, which is better (``"baseline"``, ``"ours"`` or ``"tie"``;
    AD and deletion lower is better) and, when both ran on the same images, the paired difference
    ``ours − baseline`` with its 95% interval (``significant`` when the interval excludes 0)."""
    paired = baseline["data"]["indices"] == ours["data"]["indices"]
    out: dict[str, Any] = {"paired": paired, "methods": {}}
    model = {}
    for key in ("accuracy", "cos"):  # higher is better for both
        b = baseline["model"][key]
        o = ours["model"][key]
        bv = b["mean"] if isinstance(b, Mapping) else b
        ov = o["mean"] if isinstance(o, Mapping) else o
        model[key] = {"baseline": bv, "ours": ov, "better": _better(bv, ov, True)}
    if paired:
        diff = torch.tensor(ours["per_sample"]["cos"]) - torch.tensor(baseline["per_sample"]["cos"])
        model["cos"]["difference"] = summarize(diff, ci=ci)
    out["model"] = model
    for m, d in ours["results"].items():
        if m not in baseline["results"]:
            continue
        out["methods"][m] = {}
        for k, s in d.items():
            if k not in baseline["results"][m]:
                continue
            hib = METRICS[k].higher_is_better
            entry = {"baseline": baseline["results"][m][k]["mean"], "ours": s["mean"], "higher_is_better": hib}
            entry["better"] = _better(entry["baseline"], entry["ours"], hib)
            if paired:
                a = torch.tensor(baseline["per_sample"]["methods"][m][k], dtype=torch.float64)
                b = torch.tensor(ours["per_sample"]["methods"][m][k], dtype=torch.float64)
                paired_diff = summarize(b - a, ci=ci)
                lo, hi = paired_diff["ci_low"], paired_diff["ci_high"]
                entry["difference"] = paired_diff
                entry["significant"] = lo is not None and hi is not None and (lo > 0 or hi < 0)
            out["methods"][m][k] = entry
    return out


def _better(base: float | None, ours: float | None, higher_is_better: bool) -> str | None:
    if base is None or ours is None:
        return None
    if base == ours:
        return "tie"
    return "ours" if (ours > base) == higher_is_better else "baseline"


def compare_table(
    baseline: Mapping[str, Any], ours: Mapping[str, Any], *, labels: tuple[str, str] = ("baseline", "ours")
) -> str:
    """SPEC 5 side by side, in Markdown: accuracy and mean cos, then per method each metric for the
    baseline and ours; the better value of each pair in bold, ``*`` where the paired 95% interval of
    the difference excludes 0 (same images)."""
    cmp = compare_results(baseline, ours)
    lb, lo = labels

    def mark(value: str, side: str, entry: Mapping[str, Any]) -> str:
        if entry.get("better") == side:
            value = f"**{value}**"
            if entry.get("significant"):
                value += "\\*"
        return value

    lines = [f"| | {lb} | {lo} |", "|---|---:|---:|"]
    acc = cmp["model"]["accuracy"]
    if acc["baseline"] is not None and acc["ours"] is not None:
        fmt = [f"{100 * acc['baseline']:.2f}", f"{100 * acc['ours']:.2f}"]
        lines.append(f"| top-1 accuracy (%) | {mark(fmt[0], 'baseline', acc)} | {mark(fmt[1], 'ours', acc)} |")
    cos = dict(cmp["model"]["cos"])
    d = cos.get("difference")
    if d is not None:
        cos["significant"] = d["ci_low"] is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
    cos_b, cos_o = f"{cos['baseline']:.4f}", f"{cos['ours']:.4f}"
    lines.append(f"| mean cos(δx, δᴳx) | {mark(cos_b, 'baseline', cos)} | {mark(cos_o, 'ours', cos)} |")
    metrics = [k for k in ours["settings"]["metrics"] if k in baseline["settings"]["metrics"]]
    head = "| method | " + " | ".join(f"{METRICS[k].title} {_arrow(k)} {lb} | {METRICS[k].title} {lo}" for k in metrics)
    rows = [head + " |", "|---|" + "---:|---:|" * len(metrics)]
    for m, entries in cmp["methods"].items():
        cells = []
        for k in metrics:
            e = entries[k]
            cells += [mark(f"{e['baseline']:.2f}", "baseline", e), mark(f"{e['ours']:.2f}", "ours", e)]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    n_b, n_o = baseline["data"]["n"], ours["data"]["n"]
    legend = (
        f"N = {n_b} ({lb}) and {n_o} ({lo}) images"
        + (", the same images" if cmp["paired"] else ", NOT the same images (no paired test)")
        + ". Bold: the better value of the pair (AD and deletion: lower is better); \\*: the paired 95% interval "
        "of the per-image difference excludes 0. Metric values ×100."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n\n" + legend + "\n"


def write_comparison(
    baseline: Mapping[str, Any],
    ours: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    labels: tuple[str, str] = ("baseline", "ours"),
) -> dict[str, Path]:
    """Write each side's report into ``out_dir/<label>/`` and ``compare.md`` + ``compare.json``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for label, res in zip(labels, (baseline, ours), strict=True):
        for k, p in write_report(res, out / label).items():
            paths[f"{label}.{k}"] = p
    paths["compare.md"] = out / "compare.md"
    atomic_write_text(
        paths["compare.md"], "# igrad evaluate: comparison\n\n" + compare_table(baseline, ours, labels=labels)
    )
    paths["compare.json"] = out / "compare.json"
    atomic_write_json(
        paths["compare.json"],
        {
            "kind": "igrad.compare",
            "labels": list(labels),
            "checkpoints": [baseline.get("checkpoint"), ours.get("checkpoint")],
            "comparison": compare_results(baseline, ours, ci=ours["settings"]["ci"]),
            "provenance": provenance(None, ours["data"]["seed"]),
        },
    )
    return paths
