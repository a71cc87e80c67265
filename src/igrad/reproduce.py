"""The paper's experiment end to end (SPEC 5): ``igrad reproduce``.

For each network, :func:`reproduce` trains the baseline (``λ = 0``) and the regularised model
(``λ > 0``, ``L = L_C + λ L_R``) from the same seed with :func:`igrad.train.fit`, evaluates every
saliency method with every metric on the same seeded test subset (:func:`igrad.evaluate.evaluate_checkpoint`
on the final weights ``last.pt``: no checkpoint is chosen on the test split), and writes into ``out``:

* ``report.md``: per network, the SPEC 5 table (:func:`igrad.evaluate.compare_table`: accuracy, mean
  ``cos(δx, δᴳx)``, each method × metric for both models, the better value in bold, ``*`` where the
  paired 95% interval excludes 0), a count of the cells the regularised model wins, the exact command,
  the configs, machine and versions, and wall times;
* ``results.json`` (with provenance), ``eval/<network>/{baseline,regularised}/`` (each model's full
  results, ``curves.png``: the insertion/deletion curves) and ``eval/<network>/compare.{md,json}``;
* ``figures/<network>.png``: the qualitative figure (the same test images; columns image, standard
  gradient, guided gradient, Grad-CAM, Score-CAM; baseline row, then regularised row);
* ``runs/<network>/{baseline,regularised}/``: the run folders of :func:`igrad.train.fit`.

A second call with the same settings trains nothing (finished runs are reused; an interrupted run
resumes exactly) and reuses each finished evaluation whose checkpoint (SHA-256) and settings are
unchanged. A run folder trained with a different config is an error, never silently reused.

:func:`ablation` trains at a small budget over ``λ ∈ {0, 7.5e-4, 7.5e-3, 7.5e-2, 0.75}`` × the error
functions of :data:`igrad.ERRORS`, holding out a validation split of the training set
(``val_fraction``), and reports validation accuracy, mean cos and Grad-CAM's five metrics on the
validation split, with the setting chosen on it (never on the test subset of the table).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import loss as _loss
from .errors import IgradError, unknown_name
from .evaluate import _sha256, compare_results, compare_table, evaluate_checkpoint, select_indices, write_comparison
from .metrics import METRICS
from .provenance import atomic_write_json, atomic_write_text, provenance
from .train import TrainConfig, config_to_toml, fit_or_resume, prepare_data

__all__ = [
    "NETWORKS",
    "PRESETS",
    "ABLATION_LAMBDAS",
    "FIGURE_METHODS",
    "preset_settings",
    "train_config",
    "reproduce",
    "ablation",
]

#: The two networks of the paper's table.
NETWORKS = ("cifar_resnet18", "cifar_mobilenet_v2")
#: λ values of the ablation (SPEC 5 / issue 6).
ABLATION_LAMBDAS = (0.0, 7.5e-4, 7.5e-3, 7.5e-2, 0.75)
#: Columns of the qualitative figure after the image.
FIGURE_METHODS = ("gradient", "guided", "gradcam", "scorecam")
LABELS = ("baseline", "regularised")

_EVAL_DEFAULTS: dict[str, Any] = {
    "limit": 500,
    "seed": 0,
    "methods": "all",
    "metrics": "all",
    "batch_size": 64,
    "target": "gt",
    "ci": "normal",
}

#: Presets, as data. ``train``: :class:`igrad.train.TrainConfig` overrides of the recipe ``recipe``
#: (a :data:`igrad.train.PRESETS` name) shared by every run; ``networks``: extra overrides per network;
#: ``lam``: λ of the regularised model (``None``: :data:`igrad.DEFAULT_LAMBDA` at call time);
#: ``evaluate``: the evaluation settings (:func:`igrad.evaluate.evaluate_model` arguments);
#: ``figure_images``: test images in the qualitative figure; ``ablation``: the ablation's budget.
#:
#: ``paper`` (a GPU): SPEC 2's recipe as is (200 epochs, MultiStep 60/120/160, full width), all
#: methods and metrics on a seeded 2 000-image test subset; its ablation trains 20 epochs per setting.
#:
#: ``cpu`` (≈ 90 min on a 2-core machine at ``--threads 1`` while something else runs). Step times at
#: batch 128, width 0.25, one thread, measured here with another training job running: ResNet-18
#: 0.46 s (λ = 0) and 0.98 s (λ > 0: three backward passes), MobileNet-V2 0.70 s and 1.62 s; one step
#: of all four runs ≈ 3.8 s. 4 epochs × 200 steps = 800 steps per run (102 400 samples ≈ 2 passes over
#: CIFAR-100's 50 000) ⇒ 800 × 3.8 s ≈ 50 min of training. After each epoch the trainer measures accuracy on all
#: 10 000 test images (measured, 1 thread: 16 s ResNet, 42 s MobileNet) and cos on 200 images ⇒
#: 4 epochs × (2 × 20 s + 2 × 48 s) ≈ 9 min: hence few long epochs, not many short ones. Evaluation
#: (measured, 1 thread, per image, all five metrics): ResNet-18 0.07 s per gradient/CAM method and
#: 0.23 s for Score-CAM; MobileNet-V2 0.09 s and 1.7 s (Score-CAM: 320 masked forwards) ⇒ 200 images ×
#: 2 models × (0.51 s + 2.07 s) ≈ 17 min, plus 2 min of whole-test-set accuracy. Total ≈ 80 min, with a
#: margin for a busier machine.
#: The half-epoch warm-up and the cosine schedule end a short run at a low rate, which matters more
#: here than the schedule's shape. Five methods (the four of the figure and Grad-CAM++) on 200 images:
#: the 95% intervals are wide (printed in every cell); the paper preset evaluates all eleven.
#: Its ablation (ResNet-18): 1 + 4 × 3 = 13 runs of 2 × 60 steps with a 10% validation split ⇒
#: 120 × (0.46 s + 12 × 0.98 s) ≈ 25 min, plus per-epoch test and validation accuracy (≈ 25 s × 26)
#: ≈ 11 min, plus Grad-CAM on 100 validation images per run (≈ 2 min): ≈ 40 min.
#:
#: ``demo`` (a few minutes): width 0.125, one epoch of 60 steps (MobileNet-V2, 0.8 s and 1.4 s per step
#: even at this width, 30), one accuracy pass over the test set per run, 32 test images for three
#: methods (Score-CAM only in the figure: on MobileNet-V2 it costs 1.5 s per image). It shows the
#: pipeline and the direction of cos(δx, δᴳx), not the paper's numbers.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "recipe": "paper",
        "train": {},
        "networks": {},
        "lam": None,
        "evaluate": {"limit": 2000, "methods": "all", "metrics": "all", "batch_size": 128},
        "figure_images": 6,
        "ablation": {
            "train": {"epochs": 20, "milestones": [10, 15], "val_fraction": 0.1},
            "evaluate": {"limit": 1000},
        },
    },
    "cpu": {
        "recipe": "cpu",
        "train": {"epochs": 4, "steps_per_epoch": 200, "warmup_epochs": 0.5, "width": 0.25, "cos_samples": 200},
        "networks": {},
        "lam": None,
        "evaluate": {
            "limit": 200,
            "methods": ["gradient", "guided", "gradcam", "gradcam++", "scorecam"],
            "metrics": "all",
            "batch_size": 50,
        },
        "figure_images": 6,
        "ablation": {
            "train": {"epochs": 2, "steps_per_epoch": 60, "val_fraction": 0.1},
            "evaluate": {"limit": 100},
        },
    },
    "demo": {
        "recipe": "cpu",
        "train": {"epochs": 1, "steps_per_epoch": 60, "warmup_epochs": 0.2, "width": 0.125, "cos_samples": 100},
        "networks": {"cifar_mobilenet_v2": {"steps_per_epoch": 30}},
        # 60 steps are too few for the default λ to move anything; a strong λ makes the effect on
        # cos(δx, δᴳx) visible in a few minutes (README, "Decisions": λ = 0.75 aligns, at an accuracy cost)
        "lam": 0.75,
        "evaluate": {"limit": 32, "methods": ["gradient", "guided", "gradcam"], "metrics": "all", "batch_size": 32},
        "figure_images": 3,
        "ablation": {
            "train": {"epochs": 1, "steps_per_epoch": 20, "warmup_epochs": 0.2, "val_fraction": 0.1},
            "evaluate": {"limit": 32},
        },
    },
}


def preset_settings(
    preset: str,
    *,
    train: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    lam: float | None = None,
    figure_images: int | None = None,
) -> dict[str, Any]:
    """The settings of ``preset`` with overrides: ``train`` (TrainConfig fields, for every run),
    ``evaluation`` (evaluation settings), ``lam`` and ``figure_images``. A deep copy: changing it leaves
    :data:`PRESETS` alone."""
    if preset not in PRESETS:
        raise unknown_name("reproduce preset", preset, PRESETS)
    s = copy.deepcopy(PRESETS[preset])
    s["preset"] = preset
    s["train"] = {**s["train"], **(train or {})}
    # the caller's overrides also win over the preset's per-network values
    s["networks"] = {net: {**values, **(train or {})} for net, values in s["networks"].items()}
    s["evaluate"] = {**_EVAL_DEFAULTS, **s["evaluate"], **(evaluation or {})}
    unknown = set(s["evaluate"]) - set(_EVAL_DEFAULTS)
    if unknown:
        raise unknown_name("evaluation setting", sorted(unknown)[0], _EVAL_DEFAULTS)
    s["lam"] = float(lam if lam is not None else (s["lam"] if s["lam"] is not None else _loss.DEFAULT_LAMBDA))
    if not (math.isfinite(s["lam"]) and s["lam"] > 0):
        raise IgradError(f"the regularised model needs λ > 0, got {s['lam']}")
    if figure_images is not None:
        s["figure_images"] = int(figure_images)
    return s


def train_config(settings: Mapping[str, Any], network: str, data: str, lam: float, out: Path) -> TrainConfig:
    """The :class:`TrainConfig` of one run: the recipe, the preset's shared and per-network overrides,
    then ``model``, ``data``, ``lam`` and ``out``."""
    return TrainConfig.preset_config(
        settings["recipe"],
        **{**settings["train"], **settings["networks"].get(network, {})},
        model=network,
        data=str(data),
        lam=float(lam),
        out=str(out),
    )


def _check_networks(networks: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    from .models import MODELS

    names = list(default) if not networks else list(dict.fromkeys(networks))
    for n in names:
        if n not in MODELS and not n.startswith("tv:"):
            raise unknown_name("network", n, MODELS)
    return names


def _train(config: TrainConfig, quiet: bool) -> tuple[Any, bool]:
    """Train ``config`` in ``config.out``, reusing a finished run and resuming an interrupted one;
    returns the :class:`igrad.train.RunResult` and whether a step was trained by this call."""
    last = Path(config.out) / "last.pt"
    before = last.stat().st_mtime_ns if last.is_file() else None
    result = fit_or_resume(config, quiet=quiet)
    trained = before is None or last.stat().st_mtime_ns != before
    return result, trained


def _eval_key(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings["evaluate"]), sort_keys=True))


def _evaluate(
    checkpoint: Path, data: str, out: Path, settings: Mapping[str, Any], device: str | None, progress: bool
) -> tuple[dict[str, Any], bool]:
    """``evaluate_checkpoint`` on the test split, or the stored results in ``out/results.json`` when
    they are of the same checkpoint (SHA-256) and settings; returns (results, reused)."""
    key = _eval_key(settings)
    stored = out / "results.json"
    if stored.is_file():
        try:
            old = json.loads(stored.read_text(encoding="utf-8"))
            if (
                old.get("reproduce", {}).get("evaluate") == key
                and old.get("checkpoint", {}).get("sha256") == _sha256(checkpoint)
                and old.get("data", {}).get("source") == str(data)
            ):
                return old, True
        except (OSError, ValueError):
            pass  # unreadable: evaluate again
    ev = settings["evaluate"]
    results = evaluate_checkpoint(
        checkpoint,
        data,
        split="test",
        device=device,
        methods=ev["methods"],
        metrics=ev["metrics"],
        limit=ev["limit"],
        seed=ev["seed"],
        target=ev["target"],
        batch_size=ev["batch_size"],
        ci=ev["ci"],
        progress=progress,
    )
    results["reproduce"] = {"evaluate": key}
    return results, False


def _figure(
    models: Mapping[str, torch.nn.Module], config: TrainConfig, settings: Mapping[str, Any], path: Path
) -> list[int]:
    """The qualitative figure on the first ``figure_images`` images of the evaluated test subset."""
    from .visualize import qualitative_figure

    data = prepare_data(config.replace(val_fraction=0.0))
    ev = settings["evaluate"]
    n_images = min(int(settings["figure_images"]), len(data.test))
    indices = select_indices(len(data.test), ev["limit"], ev["seed"])[:n_images]
    device = next(iter(next(iter(models.values())).parameters())).device
    x = data.normalization.apply(data.test.images[indices].to(device))
    y = data.test.labels[indices].to(device)
    qualitative_figure(
        models,
        x,
        y,
        list(FIGURE_METHODS),
        data.normalization.mean,
        data.normalization.std,
        path,
        class_names=data.classes,
        title=f"{config.model}: baseline (λ = 0) vs regularised; target = label",
    )
    return indices.tolist()


def _model_row(results: Mapping[str, Any]) -> dict[str, Any]:
    mo = results["model"]
    return {
        "accuracy": mo["accuracy"],
        "cos": mo["cos"],
        "results": results["results"],
        "evaluation_s": results["timing"]["total_s"],
    }


def _wins(cmp: Mapping[str, Any]) -> dict[str, int]:
    counts = {"cells": 0, "regularised": 0, "baseline": 0, "tie": 0, "regularised_significant": 0}
    counts["baseline_significant"] = 0
    for entries in cmp["methods"].values():
        for e in entries.values():
            counts["cells"] += 1
            side = {"ours": "regularised", "baseline": "baseline", "tie": "tie"}.get(e["better"] or "tie", "tie")
            counts[side] += 1
            if e.get("significant") and side != "tie":
                counts[f"{side}_significant"] += 1
    return counts


def _command_line(command: str | None, preset: str, data: str, out: Path) -> str:
    if command:
        return command
    return f"igrad reproduce --preset {preset} --data {data} --out {out}"


def reproduce(
    preset: str,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    networks: Sequence[str] | None = None,
    lam: float | None = None,
    train: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    figure_images: int | None = None,
    device: str | None = None,
    quiet: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report the baseline and the regularised model of each network (module
    docstring). ``train``/``evaluation``/``lam``/``figure_images`` override the preset
    (:func:`preset_settings`); ``device`` is used for training (``TrainConfig.device``) and evaluation;
    ``command`` is the command line recorded in the report. Returns the content of ``results.json``."""
    started = time.perf_counter()
    data = os.fspath(data)
    out = Path(out)
    train = dict(train or {})
    if device is not None:
        train.setdefault("device", device)
    settings = preset_settings(preset, train=train, evaluation=evaluation, lam=lam, figure_images=figure_images)
    nets = _check_networks(networks, NETWORKS)
    # every config is checked before anything is trained
    configs = {
        net: {
            label: train_config(settings, net, data, value, out / "runs" / net / label)
            for label, value in zip(LABELS, (0.0, settings["lam"]), strict=True)
        }
        for net in nets
    }
    for per_net in configs.values():
        for c in per_net.values():
            c.validate()
    report: dict[str, Any] = {
        "kind": "igrad.reproduce",
        "format": 1,
        "preset": preset,
        "command": _command_line(command, preset, data, out),
        "data": data,
        "lam": settings["lam"],
        "settings": settings,
        "networks": {},
    }
    for net in nets:
        entry: dict[str, Any] = {"runs": {}, "trained": {}, "evaluation_reused": {}}
        results: dict[str, dict[str, Any]] = {}
        models: dict[str, torch.nn.Module] = {}
        for label, config in configs[net].items():
            if not quiet:
                print(f"[reproduce] {net} {label} (λ = {config.lam:g}): training", file=sys.stderr)
            run, trained = _train(config, quiet)
            checkpoint = run.run_dir / "last.pt"
            if not quiet:
                print(f"[reproduce] {net} {label}: evaluating {checkpoint}", file=sys.stderr)
            res, reused = _evaluate(
                checkpoint, data, out / "eval" / net / label, settings, device, progress and not quiet
            )
            results[label] = res
            models[label] = run.model
            entry["trained"][label] = trained
            entry["evaluation_reused"][label] = reused
            entry["runs"][label] = {
                "lam": config.lam,
                "run_dir": str(run.run_dir),
                "checkpoint": res["checkpoint"],
                "epochs": len(run.history),
                "steps": run.final.get("step"),
                "train_s": run.final.get("elapsed"),
                "final": {k: run.final.get(k) for k in ("test_acc", "cos", "train_acc", "loss", "l_c", "l_r")},
                "config": configs[net][label].to_dict(),
                **_model_row(res),
            }
        write_comparison(results["baseline"], results["regularised"], out / "eval" / net, labels=LABELS)
        entry["comparison"] = compare_results(
            results["baseline"], results["regularised"], ci=settings["evaluate"]["ci"]
        )
        entry["wins"] = _wins(entry["comparison"])
        entry["table"] = compare_table(
            results["baseline"], results["regularised"], labels=("baseline λ=0", f"regularised λ={settings['lam']:g}")
        )
        lam_models = {
            "baseline (λ = 0)": models["baseline"],
            f"regularised (λ = {settings['lam']:g})": models["regularised"],
        }
        figure = out / "figures" / f"{net}.png"
        entry["figure"] = {
            "path": str(figure.relative_to(out)),
            "indices": _figure(lam_models, configs[net]["baseline"], settings, figure),
        }
        entry["curves"] = {label: str(Path("eval") / net / label / "curves.png") for label in LABELS}
        report["networks"][net] = entry
    report["wall_time_s"] = time.perf_counter() - started
    report["provenance"] = provenance(
        {"preset": preset, "settings": settings, "data": data}, settings["evaluate"]["seed"]
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "report.md", _report_markdown(report, out))
    return report


def _rel(path: str | Path, root: Path) -> str:
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _report_markdown(report: Mapping[str, Any], out: Path) -> str:
    s = report["settings"]
    ev = s["evaluate"]
    prov = report["provenance"]
    lines = [
        f"# igrad reproduce: preset `{report['preset']}`",
        "",
        "The paper's claim (SPEC 5): the regularised models improve most interpretability metrics for two "
        "networks while staying within a small margin of the standard model's accuracy. Below, both models of "
        "each network, trained from the same seed with the same recipe, differ only in λ.",
        "",
        f"- command: `{report['command']}`",
        f"- data: `{report['data']}`; λ of the regularised model: {report['lam']:g}",
        f"- evaluation: {ev['limit'] or 'all'} test images (seed {ev['seed']}), the same for every model; "
        f"target = {'label' if ev['target'] == 'gt' else 'prediction'}; final weights (`last.pt`)",
        f"- wall time of this call: {_fmt_s(report['wall_time_s'])}",
        "",
    ]
    for net, entry in report["networks"].items():
        w = entry["wins"]
        base, reg = entry["runs"]["baseline"], entry["runs"]["regularised"]
        acc_b, acc_r = base["accuracy"], reg["accuracy"]
        lines += [
            f"## {net}",
            "",
            entry["table"],
            f"Regularised better in **{w['regularised']} of {w['cells']}** method × metric cells "
            f"({w['regularised_significant']} with a paired 95% interval excluding 0); baseline better in "
            f"{w['baseline']} ({w['baseline_significant']} significant); ties {w['tie']}. "
            f"Top-1 accuracy {100 * acc_b:.2f}% → {100 * acc_r:.2f}% ({100 * (acc_r - acc_b):+.2f} points); "
            f"mean cos(δx, δᴳx) {base['cos']['mean']:.4f} → {reg['cos']['mean']:.4f}.",
            "",
            "| model | λ | epochs | steps | training time (with per-epoch tests) | evaluation time | run folder |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for label in LABELS:
            r = entry["runs"][label]
            lines.append(
                f"| {label} | {r['lam']:g} | {r['epochs']} | {r['steps']} | {_fmt_s(r['train_s'])} | "
                f"{_fmt_s(r['evaluation_s'])} | `{_rel(r['run_dir'], out)}` |"
            )
        lines += [
            "",
            f"Insertion/deletion curves: [baseline]({entry['curves']['baseline']}), "
            f"[regularised]({entry['curves']['regularised']}).",
            "",
            f"![qualitative figure, {net}]({entry['figure']['path']})",
            "",
            f"Qualitative figure: test images {entry['figure']['indices']} (the first of the evaluated subset); "
            "columns image, "
            + ", ".join(FIGURE_METHODS)
            + "; for each image the baseline row, then the regularised row.",
            "",
        ]
    ablation_json = out / "ablation" / "results.json"
    if ablation_json.is_file():
        try:
            chosen = {
                n: e["chosen"] for n, e in json.loads(ablation_json.read_text(encoding="utf-8"))["networks"].items()
            }
            lines += [
                "## Ablation",
                "",
                f"See [ablation/report.md](ablation/report.md); chosen on the validation split: `{json.dumps(chosen)}`",
                "",
            ]
        except (OSError, ValueError, KeyError):
            pass
    first_net = next(iter(report["networks"].values()), None)
    lines += [
        "## Configuration",
        "",
        "Training (the baseline's config; the regularised run differs only in `lam` "
        "and `out`; networks differ in `model`):",
        "",
    ]
    if first_net is not None:
        lines += ["```toml", config_to_toml(first_net["runs"]["baseline"]["config"]).rstrip(), "```", ""]
    lines += ["Evaluation:", "", "```json", json.dumps(ev, indent=2), "```", ""]
    lines += [
        "## Machine and versions",
        "",
        f"- versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}",
        f"- commit: {prov.get('commit')}",
        f"- machine: {prov['machine'].get('platform')}, {prov['machine'].get('cpus')} CPUs, "
        f"{prov['machine'].get('torch_threads')} torch threads, GPU: {prov['machine'].get('cuda') or 'none'}",
        f"- finished: {prov.get('time')}",
        "",
        "Metric values ×100; AD and deletion: lower is better; the others higher. "
        f"Metrics: {', '.join(METRICS[k].title for k in METRICS)}.",
        "",
    ]
    return "\n".join(lines)


def _ablation_choice(rows: Sequence[Mapping[str, Any]], acc_margin: float) -> dict[str, Any] | None:
    """The chosen setting on the validation split: among ``λ > 0`` rows whose validation accuracy is at
    most ``acc_margin`` (absolute) below the ``λ = 0`` row's, the one with the most Grad-CAM metrics
    *clearly* better than ``λ = 0`` (paired 95% interval of the per-image difference excluding 0),
    then the most metrics better at all, then validation accuracy, then mean cos. When no setting is
    clearly better on any metric, the choice says so (``"clear": 0`` and a ``"note"``): the
    differences are then within the noise of the split, and the pick means little."""
    base = next((r for r in rows if r["lam"] == 0), None)
    if base is None:
        return None
    best, best_key = None, None
    for r in rows:
        if r["lam"] == 0 or r["val_acc"] < base["val_acc"] - acc_margin:
            continue
        vs = r.get("vs_baseline", {})
        wins = sum(1 for e in vs.values() if e["better"] == "ours")
        clear = sum(1 for e in vs.values() if e["better"] == "ours" and e.get("significant"))
        key = (clear, wins, r["val_acc"], r["val_cos"])
        if best_key is None or key > best_key:
            best, best_key = r, key
    if best is None or best_key is None:
        return {"lam": 0.0, "error": None, "wins": 0, "reason": "every λ > 0 lost more than the accuracy margin"}
    chosen = {
        "lam": best["lam"],
        "error": best["error"],
        "clear": best_key[0],
        "wins": best_key[1],
        "of": len(best["gradcam"]),
    }
    if best_key[0] == 0:
        chosen["note"] = "no setting is clearly better than λ = 0 on any Grad-CAM metric: within the split's noise"
    return chosen


def ablation(
    preset: str,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    networks: Sequence[str] | None = None,
    lambdas: Sequence[float] = ABLATION_LAMBDAS,
    errors: Sequence[str] | None = None,
    train: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    acc_margin: float = 0.02,
    device: str | None = None,
    quiet: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train each (λ, error) at the preset's ablation budget (``PRESETS[preset]["ablation"]``, with a
    validation split ``val_fraction``) and measure, on the validation split: accuracy, mean
    ``cos(δx, δᴳx)`` and Grad-CAM's five metrics (the preset's evaluation settings, ``limit`` from the
    ablation's). ``λ = 0`` is trained once (the error is then unused). Writes
    ``out/ablation/{report.md,results.json}`` and the runs under ``out/ablation/runs``; returns the
    results. Default network: the first of :data:`NETWORKS`. Finished runs and evaluations are reused."""
    from .checkpoint import load_model
    from .evaluate import evaluate_model

    started = time.perf_counter()
    data = os.fspath(data)
    root = Path(out) / "ablation"
    base = preset_settings(preset)
    ab = base["ablation"]
    train_over = {**ab["train"], **(train or {})}
    if device is not None:
        train_over.setdefault("device", device)
    settings = preset_settings(
        preset, train=train_over, evaluation={**ab.get("evaluate", {}), **(evaluation or {}), "methods": ["gradcam"]}
    )
    if not settings["train"].get("val_fraction"):
        raise IgradError("the ablation chooses on a validation split: val_fraction must be > 0")
    errs = list(errors) if errors else list(_loss.ERRORS)
    for e in errs:
        if e not in _loss.ERRORS:
            raise unknown_name("error function", e, _loss.ERRORS)
    nets = _check_networks(networks, NETWORKS[:1])
    grid = [(0.0, errs[0])] if 0.0 in lambdas else []
    grid += [(float(lam), e) for lam in lambdas if lam != 0 for e in errs]
    ev = settings["evaluate"]
    key = _eval_key(settings)
    report: dict[str, Any] = {
        "kind": "igrad.reproduce.ablation",
        "format": 1,
        "preset": preset,
        "command": command or f"igrad reproduce --ablation --preset {preset} --data {data} --out {out}",
        "data": data,
        "settings": settings,
        "acc_margin": acc_margin,
        "networks": {},
    }
    for net in nets:
        rows = []
        base_res: dict[str, Any] | None = None
        for lam, err in grid:
            name = f"lam{lam:g}" if lam == 0 else f"{err}-lam{lam:g}"
            config = train_config(settings, net, data, lam, root / "runs" / net / name).replace(error=err)
            if not quiet:
                print(f"[ablation] {net} {name}: training", file=sys.stderr)
            run, _ = _train(config, quiet)
            checkpoint = run.run_dir / "last.pt"
            stored = root / "eval" / net / f"{name}.json"
            res = None
            if stored.is_file():
                old = json.loads(stored.read_text(encoding="utf-8"))
                if (
                    old.get("reproduce", {}).get("evaluate") == key
                    and old.get("sha256") == _sha256(checkpoint)
                    and "per_sample" in old
                ):
                    res = old
            if res is None:
                if not quiet:
                    print(f"[ablation] {net} {name}: evaluating Grad-CAM on the validation split", file=sys.stderr)
                model, cfg = load_model(checkpoint, map_location=next(run.model.parameters()).device)
                val = prepare_data(config).val
                assert val is not None  # the ablation's configs hold out a validation split
                res = evaluate_model(
                    model,
                    val,
                    mean=cfg["mean"],
                    std=cfg["std"],
                    methods=["gradcam"],
                    metrics=ev["metrics"],
                    limit=min(ev["limit"], len(val)) if ev["limit"] else None,
                    seed=ev["seed"],
                    target=ev["target"],
                    batch_size=ev["batch_size"],
                    ci=ev["ci"],
                    progress=progress and not quiet,
                    config=cfg,
                    source=f"{data} (validation split, val_fraction {config.val_fraction})",
                )
                kept = ("model", "data", "settings", "results", "per_sample", "timing", "provenance")
                res = {k: res[k] for k in kept}
                res["sha256"] = _sha256(checkpoint)
                res["reproduce"] = {"evaluate": key}
                atomic_write_json(stored, res)
            rows.append(
                {
                    "name": name,
                    "lam": lam,
                    "error": err if lam > 0 else None,
                    "val_acc": res["model"]["accuracy"],
                    "val_cos": res["model"]["cos"]["mean"],
                    "test_acc": run.test_acc,
                    "gradcam": {k: v for k, v in res["results"]["gradcam"].items()},
                    "run_dir": str(run.run_dir),
                    "train_s": run.final.get("elapsed"),
                    "n": res["data"]["n"],
                }
            )
            if lam == 0:
                base_res = res
            elif base_res is not None:  # paired against λ = 0 on the same validation images
                rows[-1]["vs_baseline"] = compare_results(base_res, res, ci=ev["ci"])["methods"]["gradcam"]
        report["networks"][net] = {"rows": rows, "chosen": _ablation_choice(rows, acc_margin)}
    report["wall_time_s"] = time.perf_counter() - started
    report["provenance"] = provenance({"preset": preset, "settings": settings, "data": data}, ev["seed"])
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "results.json", report)
    atomic_write_text(root / "report.md", _ablation_markdown(report))
    return report


def _ablation_mark(entry: Mapping[str, Any] | None) -> str:
    """`` +``/`` −`` for a metric clearly better/worse than λ = 0 (paired interval excluding 0)."""
    if not entry or not entry.get("significant"):
        return ""
    return " +" if entry["better"] == "ours" else " −"


def _ablation_markdown(report: Mapping[str, Any]) -> str:
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
        f"Versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}; commit {prov.get('commit')}; "
        f"{prov['machine'].get('platform')}, {prov['machine'].get('cpus')} CPUs; {prov.get('time')}.",
        "",
        "Metric values ×100; test accuracy is shown for information only (not used for the choice).",
        "",
    ]
    return "\n".join(lines)
