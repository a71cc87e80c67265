"""The paper's experiment end to end (docs/method.md §The reproduction table): ``igrad reproduce``.

For each network, :func:`reproduce` trains the baseline (``λ = 0``) and the regularised model
(``λ > 0``, ``L = L_C + λ L_R``) from the same seed with :func:`igrad.train.fit`, evaluates every
saliency method with every metric on the same seeded test subset (:func:`igrad.evaluate.evaluate_checkpoint`
on the final weights ``last.pt``: no checkpoint is chosen on the test split), and writes into ``out``:

* ``report.md``: per network, the reproduction table (docs/method.md) (:func:`igrad.evaluate.compare_table`: accuracy,
mean
  ``cos(δx, δᴳx)``, each method × metric for both models, the better value in bold, ``*`` where the
  paired 95% interval excludes 0), a count of the cells the regularised model wins, the exact command,
  the configs, machine and versions, and wall times;
* ``results.json`` (with provenance), ``eval/<network>/{baseline,regularised}/`` (each model's full
  results, ``curves.png``: the insertion/deletion curves) and ``eval/<network>/compare.{md,json}``;
* ``figures/<network>.png``: the qualitative figure (the same test images; columns image, standard
  gradient, guided gradient, Grad-CAM, Score-CAM; baseline row, then regularised row);
* ``runs/<network>/{baseline,regularised}/``: the run folders of :func:`igrad.train.fit`.

Where the preset (or the caller) gives ``finetuned`` settings, each network gets fine-tuned models: the
baseline's final weights trained a few epochs with ``L_R`` (``fine-tuned``), with ``control`` its λ = 0 control
(``fine-tuned-control``: the same fine-tuning, steps, rate and seed, without ``L_R``), and with ``seeds`` both again
per later seed (``fine-tuned-seed1``, ...). Each fine-tuned model is compared with its control (the effect of
``L_R`` alone; ``eval/<network>/compare-<model>-vs-control.{md,json}``), the first also with the baseline it
started from (``compare-fine-tuned.{md,json}``; it mixes ``L_R`` with the extra epochs), and two seeds' pairs
are set beside the difference between their controls (the training's own noise): ``results.json``'s network
entry holds them under ``"fine-tuning"`` and ``"fine-tuned"``.

Every model's final weights are also written alone (model state and config, float32) to
``weights/<network>/<label>.pt``, with their SHA-256 in the report: ``igrad evaluate --checkpoint`` on one gives
its cells again (the evaluation loads each model from its checkpoint exactly as that command does). Run
folders may live outside ``out`` (``runs``), where a replaced checkout cannot take them.

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
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import loss as _loss
from .atomic import atomic_write_json, atomic_write_text
from .demo import DEMO_FINETUNE, DEMO_LAMBDA, DEMO_TRAIN, demo_amp
from .errors import IgradError, unknown_name
from .evaluate import EvalConfig, compare_results, evaluate_model, select_indices
from .normalization import Normalization
from .provenance import file_sha256, machine_info, process_commit, provenance
from .report import (
    CONTROL,
    FIGURE_METHODS,
    FINETUNED,
    LABELS,
    ablation_markdown,
    compare_table,
    finetuned_label,
    reproduce_markdown,
    write_comparison,
    write_report,
)
from .stats import difference_interval, wilson_interval
from .torch_utils import device_of
from .train import RESOURCE_FIELDS, TrainConfig, TrainData, fit_or_resume, prepare_data

__all__ = [
    "NETWORKS",
    "EXPERIMENTS",
    "SCOPES",
    "LABELS",
    "FINETUNED",
    "CONTROL",
    "finetuned_models",
    "export_weights",
    "ABLATION_LAMBDAS",
    "FIGURE_METHODS",
    "figure_methods",
    "PRECISION_FIELDS",
    "preset_settings",
    "train_config",
    "reproduce",
    "ablation",
]

#: The two networks of the paper's table.
NETWORKS = ("cifar_resnet18", "cifar_mobilenet_v2")
#: λ values of the ablation (docs/method.md §The reproduction table).
ABLATION_LAMBDAS = (0.0, 7.5e-4, 7.5e-3, 7.5e-2, 0.75)
#: Settings that choose the arithmetic, not the experiment: bf16 autocast (``amp``) in training and in evaluation
#: (the ``cpu`` recipe's bf16, or float32 with ``--no-amp`` where bf16 would be emulated). A report may
#: hold networks computed at different precisions (one per working session, on different machines); each
#: network's ``made_by`` says which, and the report prints it under the network's heading.
PRECISION_FIELDS = frozenset({"amp"})
#: Evaluation settings of every experiment preset before its own (:class:`igrad.evaluate.EvalConfig`
#: defaults otherwise).
_EVAL_DEFAULTS: dict[str, Any] = {"limit": 500}

#: Experiment presets (named apart from :data:`igrad.train.PRESETS`, the training recipes), as data.
#: ``train``: :class:`igrad.train.TrainConfig` overrides of the recipe ``recipe``
#: (a :data:`igrad.train.PRESETS` name) shared by every run; ``networks``: extra overrides per network;
#: ``lam``: λ of the regularised model (``None``: :data:`igrad.DEFAULT_LAMBDA` at call time);
#: ``evaluate``: the evaluation settings (:class:`igrad.evaluate.EvalConfig` fields);
#: ``figure_images``: test images in the qualitative figure; ``ablation``: the ablation's budget;
#: ``finetuned`` (optional): a third model, the baseline's final weights fine-tuned with ``L_R`` at its own
#: ``lam`` with the ``train`` overrides (fresh optimiser and schedule), compared with the baseline like the
#: regularised model.
#:
#: ``paper`` (a GPU): the paper-scale recipe as is (docs/method.md §Networks and recipes) (200 epochs, MultiStep
#: 60/120/160, full width), all
#: methods and metrics on a seeded 2 000-image test subset; its ablation trains 20 epochs per setting.
#:
#: ``cpu``: the ``cpu`` training recipe as
#: is (:data:`igrad.train.PRESETS`: 24 epochs, 1/2 width, bf16 + channels-last, ρ = 0.25; ResNet-18 about 52
#: and 78 min, MobileNet-V2 about 90 min a model on one thread each, side by side, with bf16 units; in float32
#: on a 2-core AMD Zen 3 without them, ``--no-amp``, MobileNet-V2 takes about 9 (baseline) and 10.5
#: (regularised) min an epoch side by side with nothing else running, 3.6 and 4.2 hours, and about 45 min to
#: evaluate a model: more than one working session, so it resumes only where the run folders survive), λ chosen
#: on the validation split by the trade-off study
#: (results/tradeoff/), and eight methods (the CAM family but the slow Ablation-CAM, the gradient and guided
#: backpropagation) with all five metrics on 1 000 seeded test images, the same for every model, in bf16
#: (``amp``: metric means within 0.1 points of float32's on 200 images, AI within one or two images,
#: results/eval_bf16.json; 4.6x faster) with accuracy and cos in float32. Precision (:data:`PRECISION_FIELDS`)
#: may differ between the networks of one report.
#:
#: ``demo`` (`make demo`: 2 min on 2 cores with bf16 units, 7-8.5 min in float32 on a 2-core Zen 3): ResNet-18
#: alone, the baseline 3 epochs at 1/4 width, the regularised model fine-tuning its final weights for 100
#: steps at rate 0.005 with λ = 2.5 (:mod:`igrad.demo`), four methods on 200 test images (bf16 where native).
#: It shows the effect on models that have learned something (Zen 3: 30.2 % and 26.2 % top-1, cos 0.05 →
#: 0.37), not the paper's numbers.
EXPERIMENTS: dict[str, dict[str, Any]] = {
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
        "train": {},
        "networks": {},
        # the trade-off study's choice on the validation split (results/tradeoff/report.md: the largest cos
        # within a point of λ = 0's top-1 among the runs from scratch and with λ warm-up at a third of the
        # budget): λ = 0.025 aligned less, 0.25 missed the point by 18, the warm-up runs (λ 0.75 and 2.5) by 24
        # and 37; λ = 2.5 from scratch cannot qualify where 0.75 already lost 41 points
        "lam": 0.075,
        # the third model: the baseline fine-tuned 3 epochs at rate 0.01 with λ = 0.75, the study's fine-tuning
        # run that aligned most within 1.5 points of its control's validation top-1 (ft-lam0.75: 67.8 % vs the
        # control's 69.0 %, cos 0.23 vs 0.00). Chosen on the validation split after the fine-tuning runs had
        # finished (the pre-stated rule covers the runs from scratch; applied to fine-tuning it would take
        # λ = 0.25, cos 0.03, which barely moves the gradients); never on the test set.
        # each fine-tuned model is compared with its control (the same fine-tuning at λ = 0), once per seed: the
        # second seed's pair says how much of a cell's difference is the training's own noise
        "finetuned": {"lam": 0.75, "train": {"epochs": 3, "lr": 0.01}, "control": True, "seeds": [0, 1]},
        "evaluate": {
            "limit": 1000,
            "methods": ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "gradient", "guided"],
            "metrics": "all",
            "batch_size": 50,
            "amp": True,
        },
        "figure_images": 6,
        "ablation": {
            "train": {"epochs": 2, "steps_per_epoch": 60, "val_fraction": 0.1},
            "evaluate": {"limit": 100},
        },
    },
    "demo": {
        "recipe": "cpu",
        "default_networks": ["cifar_resnet18"],
        "train": dict(DEMO_TRAIN),
        "networks": {},
        "lam": DEMO_LAMBDA,
        # bf16 (training and evaluation) only where the device computes it natively: emulated, it is an order
        # of magnitude slower than float32 (igrad.demo.demo_amp)
        "amp_where_native": True,
        # the regularised model fine-tunes the baseline (init): a fresh optimiser at a twentieth of the rate
        "finetune": dict(DEMO_FINETUNE),
        "evaluate": {
            "limit": 200,
            "methods": ["gradient", "guided", "gradcam", "gradcam++"],
            "metrics": "all",
            "batch_size": 50,
            "amp": True,
        },
        "figure_images": 3,
        "ablation": {
            "train": {"epochs": 1, "steps_per_epoch": 20, "warmup_epochs": 0.2, "val_fraction": 0.1},
            "evaluate": {"limit": 32},
        },
    },
}

#: What each preset's report can and cannot show, printed under the paper's claim (:func:`igrad.report.
#: reproduce_markdown`); kept out of the settings, which decide whether an earlier report's networks carry over.
SCOPES: dict[str, str] = {
    "paper": "the paper-scale budget: 200 epochs at full width, the scale of the paper's own table.",
    "cpu": (
        "A reduced budget that fits a 2-core CPU (by its defaults 24 epochs at 1/2 width, λ chosen on a validation "
        "split); "
        "the paper's own budget (200 epochs, full width) is `--preset paper`, on a GPU."
    ),
    "demo": (
        "The demonstration (by its defaults a 1/4-width ResNet-18 trained 3 epochs, then fine-tuned 100 steps with a "
        "strong λ). "
        "It shows what the loss does to the gradients (cos(δx, δᴳx) rises) and what that costs at this budget; "
        "it is far too small to test the claim (the README's Results hold the `cpu` preset's test)."
    ),
}


def preset_settings(
    preset: str,
    *,
    train: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    lam: float | None = None,
    figure_images: int | None = None,
    finetuned: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings of ``preset`` with overrides: ``train`` (TrainConfig fields, for every run),
    ``evaluation`` (:class:`EvalConfig` fields; ``settings["evaluate"]`` is its :meth:`EvalConfig.to_dict`),
    ``lam``, ``figure_images`` and ``finetuned`` (the fine-tuned third model, ``{"lam": λ, "train": {...}}``;
    ``{}``: none). A deep copy: changing it leaves :data:`EXPERIMENTS` alone."""
    if preset not in EXPERIMENTS:
        raise unknown_name("reproduce preset", preset, EXPERIMENTS)
    s = copy.deepcopy(EXPERIMENTS[preset])
    s["preset"] = preset
    s["train"] = {**s["train"], **(train or {})}
    # the caller's overrides also win over the preset's per-network values
    s["networks"] = {net: {**values, **(train or {})} for net, values in s["networks"].items()}
    if s.pop("amp_where_native", False):  # the caller's amp, where given, wins
        s["evaluate"]["amp"] = demo_amp(s["train"])
    s["evaluate"] = EvalConfig.from_dict({**_EVAL_DEFAULTS, **s["evaluate"], **(evaluation or {})}).to_dict()
    s["lam"] = float(lam if lam is not None else (s["lam"] if s["lam"] is not None else _loss.DEFAULT_LAMBDA))
    if not (math.isfinite(s["lam"]) and s["lam"] > 0):
        raise IgradError(f"the regularised model needs λ > 0, got {s['lam']}")
    s["finetuned"] = _finetuned_settings(s.get("finetuned") if finetuned is None else finetuned)
    if figure_images is not None:
        s["figure_images"] = int(figure_images)
    return s


def _finetuned_settings(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The fine-tuned models' settings, checked: ``{"lam": λ > 0, "train": TrainConfig overrides}``, with
    optionally ``"control": True`` (each fine-tuned model gets its λ = 0 control: the same fine-tuning, same
    seed) and ``"seeds": [s0, s1, ...]`` (the fine-tuning, and its control, once per seed; default: the
    training seed once); ``None`` when there is none."""
    if not values:
        return None
    unknown = set(values) - {"lam", "train", "control", "seeds"}
    if unknown or "lam" not in values:
        raise IgradError(
            f"the fine-tuned model's settings take 'lam', 'train', 'control' and 'seeds', got {sorted(values)}"
        )
    lam = float(values["lam"])
    if not (math.isfinite(lam) and lam > 0):
        raise IgradError(f"the fine-tuned model needs λ > 0, got {values['lam']}")
    out: dict[str, Any] = {"lam": lam, "train": dict(values.get("train") or {})}
    if values.get("control") not in (None, False, True):
        raise IgradError(f"the fine-tuned model's 'control' must be true or false, got {values['control']!r}")
    if values.get("control"):
        out["control"] = True
    if values.get("seeds") is not None:
        seeds = values["seeds"]
        if (
            not isinstance(seeds, list | tuple)
            or not seeds
            or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise IgradError(f"the fine-tuned model's 'seeds' must be distinct integers, got {seeds!r}")
        out["seeds"] = [int(x) for x in seeds]
    return out


def finetuned_models(finetuned: Mapping[str, Any] | None) -> list[tuple[str, float, int | None]]:
    """The fine-tuned models of ``settings["finetuned"]``: ``(label, λ, seed)`` for each seed (``None``: the
    training seed), the model (``λ``) then, with ``control``, its λ = 0 control
    (:func:`igrad.report.finetuned_label`)."""
    if not finetuned:
        return []
    models = []
    for i, seed in enumerate(finetuned.get("seeds") or [None]):
        models.append((finetuned_label(i, seed, control=False), float(finetuned["lam"]), seed))
        if finetuned.get("control"):
            models.append((finetuned_label(i, seed, control=True), 0.0, seed))
    return models


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


def _cached_evaluation(
    stored: Path, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """The results stored in ``stored`` when they were made with ``key`` (evaluation settings, checkpoint
    SHA-256, data), else ``compute()`` with ``key`` recorded as ``results["reproduce"]``; returns
    ``(results, reused)``. Storing is the caller's (the main table writes full reports)."""
    old = _stored_evaluation(stored, key)
    if old is not None:
        return old, True
    results = compute()
    results["reproduce"] = key
    return results, False


def _stored_evaluation(stored: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The results in ``stored`` when they are complete and were made with ``key``, else ``None``."""
    if not stored.is_file():
        return None
    try:
        old = json.loads(stored.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: evaluate again
    return old if old.get("reproduce") == key and "per_sample" in old else None


def _evaluation_key(checkpoint: Path, ev: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What a stored evaluation must have been made with to be reused: settings, weights (SHA-256), data, and
    the model as loaded from its checkpoint (``"loaded"``); in its JSON form (as stored)."""
    key = {"evaluate": dict(ev), "sha256": file_sha256(checkpoint), "data": source, "loaded": True}
    return json.loads(json.dumps(key, sort_keys=True))


def _evaluate_run(
    run: Any, split: Any, source: str, ev: Mapping[str, Any], stored: Path, progress: bool
) -> tuple[dict[str, Any], bool]:
    """Evaluate the model of ``run``'s final weights (``last.pt``), as :func:`igrad.checkpoint.load_model` loads
    it (the trainer's model may sit in another memory layout, which changes bf16 arithmetic: loaded, it is the
    model that ``igrad evaluate --checkpoint`` evaluates), on ``split`` with settings ``ev``, or reuse
    ``stored``; unfinished work is kept in ``stored``'s folder (``.partial/``)."""
    from .checkpoint import load_model

    checkpoint = Path(run.run_dir) / "last.pt"
    key = _evaluation_key(checkpoint, ev, source)

    def compute() -> dict[str, Any]:
        model, config = load_model(checkpoint, map_location=device_of(run.model))
        res = evaluate_model(
            model,
            split,
            EvalConfig.from_dict(ev),
            normalization=Normalization.from_config(config, f"run {run.run_dir}"),
            config=config,
            source=source,
            progress=progress,
            resume_dir=stored.parent / ".partial",
        )
        res["checkpoint"] = {"path": str(checkpoint), "sha256": key["sha256"]}
        return res

    return _cached_evaluation(stored, key, compute)


def _evaluate_and_store(
    run: Any, split: Any, source: str, ev: Mapping[str, Any], stored: Path, progress: bool
) -> tuple[dict[str, Any], bool]:
    """:func:`_evaluate_run`, its results written to ``stored``'s folder at once (a later model's interruption
    must not cost this evaluation; a reused one's again: the comparisons write only their own files)."""
    res, reused = _evaluate_run(run, split, source, ev, stored, progress)
    res["data"]["split"] = "test"
    write_report(res, stored.parent)
    return res, reused


def figure_methods(evaluated: Sequence[str]) -> list[str]:
    """The qualitative figure's columns: :data:`~igrad.report.FIGURE_METHODS` (the paper's figure) where they
    were evaluated; each one that was not is replaced by the next evaluated method not yet shown, so that the
    figure draws the maps the tables score (the demo evaluates Grad-CAM++ instead of Score-CAM)."""
    spare = [m for m in evaluated if m not in FIGURE_METHODS]
    columns = []
    for m in FIGURE_METHODS:
        if m in evaluated:
            columns.append(m)
        elif spare:
            columns.append(spare.pop(0))
    return columns


def _figure(
    models: Mapping[str, torch.nn.Module],
    data: TrainData,
    title: str,
    ev: Mapping[str, Any],
    n: int,
    methods: Sequence[str],
    path: Path,
) -> list[int]:
    """The qualitative figure (columns: the image, then ``methods``) on ``n`` images of the evaluated test
    subset, evenly spaced through it: an image-folder test split is ordered by class, so its first images would
    all be of one class."""
    from .visualize import qualitative_figure

    subset = select_indices(len(data.test), ev["limit"], ev["seed"])
    n_images = min(int(n), len(subset))
    indices = subset[torch.linspace(0, len(subset) - 1, n_images).round().long()]
    device = device_of(next(iter(models.values())))
    x = data.normalization.apply(data.test.images[indices].to(device))
    y = data.test.labels[indices].to(device)
    norm = data.normalization
    qualitative_figure(
        models, x, y, list(methods), norm.mean, norm.std, path, class_names=data.classes, title=title, labels=y
    )
    return indices.tolist()


def _model_row(results: Mapping[str, Any]) -> dict[str, Any]:
    mo = results["model"]
    return {
        "accuracy": mo["accuracy"],
        "accuracy_n": mo.get("accuracy_n"),
        "cos": mo["cos"],
        "results": results["results"],
        "evaluation_s": results["timing"]["total_s"],
    }


def _wins(cmp: Mapping[str, Any]) -> dict[str, int]:
    """Cells each model is better in: in all, with the cell's paired 95 % interval excluding 0
    (``*_significant``), and after Holm's correction over the network's cells (``*_holm``; from
    :func:`igrad.evaluate.compare_results`)."""
    counts = {"cells": 0, "regularised": 0, "baseline": 0, "tie": 0, "regularised_significant": 0}
    counts.update(baseline_significant=0, regularised_holm=0, baseline_holm=0)
    entries = [e for per_method in cmp["methods"].values() for e in per_method.values()]
    for e in entries:
        counts["cells"] += 1
        side = e["better"] or "tie"
        counts[side] += 1
        if side != "tie":
            counts[f"{side}_significant"] += bool(e.get("significant"))
            counts[f"{side}_holm"] += bool(e.get("holm_significant"))
    return counts


def accuracy_statistics(baseline: Mapping[str, Any], regularised: Mapping[str, Any]) -> dict[str, Any] | None:
    """Each model's top-1 with Wilson's 95 % interval and the difference (regularised − baseline) with
    Newcombe's interval (:mod:`igrad.stats`), from ``accuracy`` and ``accuracy_n`` of two run rows;
    ``None`` where the accuracy was not measured."""
    rows = (baseline, regularised)
    if any(r.get("accuracy") is None or not r.get("accuracy_n") for r in rows):
        return None
    k = [round(r["accuracy"] * r["accuracy_n"]) for r in rows]
    n = [int(r["accuracy_n"]) for r in rows]
    out: dict[str, Any] = {}
    for label, ki, ni in zip(LABELS, k, n, strict=True):
        lo, hi = wilson_interval(ki, ni)
        out[label] = {"top1": ki / ni, "ci_low": lo, "ci_high": hi, "n": ni}
    d, lo, hi = difference_interval(k[0], n[0], k[1], n[1])
    out["difference"] = {"mean": d, "ci_low": lo, "ci_high": hi}
    return out


def _command_line(command: str | None, preset: str, data: str, out: Path) -> str:
    if command:
        return command
    return f"igrad reproduce --preset {preset} --data {data} --out {out}"


def _write(
    report: dict[str, Any], folder: Path, started: float, markdown: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """Finish ``report`` (wall time since ``started``, provenance) and write ``folder/results.json`` and
    ``folder/report.md`` (``markdown(report)``), atomically; returns ``report``."""
    report["wall_time_s"] = time.perf_counter() - started
    settings = report["settings"]
    report["provenance"] = provenance(
        {"preset": report["preset"], "settings": settings, "data": report["data"]}, settings["evaluate"]["seed"]
    )
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "results.json", report)
    atomic_write_text(folder / "report.md", markdown(report))
    return report


def _run_configs(
    settings: Mapping[str, Any], nets: Sequence[str], data: str, runs_root: Path
) -> dict[str, dict[str, TrainConfig]]:
    """The baseline's and the regularised model's :class:`TrainConfig` of each network (and the fine-tuned
    models', :func:`finetuned_models`, when the settings have them), run folders ``runs_root/<network>/<label>``,
    all validated before anything is trained. With the preset's ``finetune`` overrides the regularised model
    starts from the baseline's final weights (``init``: fresh optimiser and schedule) instead of from scratch;
    the fine-tuned models always do (a control too: it differs from its model in ``lam`` alone)."""
    configs = {}
    for net in nets:
        runs = runs_root / net
        init = str(runs / LABELS[0] / "last.pt")
        base = train_config(settings, net, data, 0.0, runs / LABELS[0])
        reg = train_config(settings, net, data, settings["lam"], runs / LABELS[1])
        if settings.get("finetune"):
            reg = reg.replace(init=init, **settings["finetune"])
        configs[net] = {LABELS[0]: base, LABELS[1]: reg}
        for label, lam, seed in finetuned_models(settings.get("finetuned")):
            c = train_config(settings, net, data, lam, runs / label).replace(
                init=init, **settings["finetuned"]["train"]
            )
            configs[net][label] = c if seed is None else c.replace(seed=seed)
    for per_net in configs.values():
        for c in per_net.values():
            c.validate()
    return configs


def _test_data(cache: dict[str, TrainData], config: TrainConfig) -> TrainData:
    """The test split and its normalisation, prepared once (after the first training) for every run."""
    if "data" not in cache:
        cache["data"] = prepare_data(config.replace(val_fraction=0.0))
    return cache["data"]


def _run_row(run: Any, config: TrainConfig, res: Mapping[str, Any]) -> dict[str, Any]:
    """A run's line of the report: λ, folder, checkpoint, budget, final training numbers, config, the
    processes that trained it (commit of each) and results."""
    return {
        "lam": config.lam,
        "run_dir": str(run.run_dir),
        "checkpoint": res["checkpoint"],
        "epochs": len(run.history),
        "steps": run.final.get("step"),
        "train_s": run.final.get("elapsed"),
        "final": {k: run.final.get(k) for k in ("test_acc", "cos", "train_acc", "loss", "l_c", "l_r")},
        "config": config.to_dict(),
        "sessions": run.sessions,
        **_model_row(res),
    }


def _comparison(
    net: str,
    results: Mapping[str, dict[str, Any]],
    models: Mapping[str, torch.nn.Module],
    prepared: TrainData,
    settings: Mapping[str, Any],
    out: Path,
) -> dict[str, Any]:
    """The baseline and the regularised model of ``net`` side by side: the comparison (also written to
    ``eval/<net>/compare.{md,json}``), the cells won, the reproduction table (docs/method.md), the qualitative figure
    and the curves'
    files; with fine-tuned models, the first seed's against the baseline under ``FINETUNED`` (also written to
    ``eval/<net>/compare-fine-tuned.{md,json}``) and, with their controls, each against its control under
    ``"fine-tuning"`` (:func:`_fine_tuning`); the figure gets a row per image for the fine-tuned model and its
    control. Each model's own report in ``eval/<net>/<label>/`` is written by :func:`_network`."""
    base, reg, lam = results["baseline"], results["regularised"], settings["lam"]
    write_comparison(base, reg, out / "eval" / net, labels=LABELS, reports=False)  # _network wrote the reports
    lam_models = {"baseline (λ = 0)": models["baseline"], f"regularised (λ = {lam:g})": models["regularised"]}
    entry = _versus(base, reg, ("baseline λ=0", f"regularised λ={lam:g}"), settings)
    if FINETUNED in results:
        ft_lam = settings["finetuned"]["lam"]
        lam_models[f"fine-tuned (λ = {ft_lam:g})"] = models[FINETUNED]
        versus = _versus(base, results[FINETUNED], ("baseline λ=0", f"fine-tuned λ={ft_lam:g}"), settings)
        entry[FINETUNED] = {"lam": ft_lam, **versus}
        ft_labels = (LABELS[0], FINETUNED)
        write_comparison(
            base, results[FINETUNED], out / "eval" / net, labels=ft_labels, name=f"compare-{FINETUNED}", reports=False
        )
    if CONTROL in results:
        lam_models["fine-tuned control (λ = 0)"] = models[CONTROL]
        entry["fine-tuning"] = _fine_tuning(net, results, settings, out)
    figure = out / "figures" / f"{net}.png"
    title = f"{net}: " + " vs ".join(name.split(" (")[0] for name in lam_models) + "; target = label"
    methods = figure_methods(settings["evaluate"]["methods"])
    indices = _figure(lam_models, prepared, title, settings["evaluate"], settings["figure_images"], methods, figure)
    entry["figure"] = {"path": str(figure.relative_to(out)), "indices": indices, "methods": methods}
    entry["curves"] = {label: str(Path("eval") / net / label / "curves.png") for label in results}
    return entry


def _fine_tuning(
    net: str, results: Mapping[str, dict[str, Any]], settings: Mapping[str, Any], out: Path
) -> dict[str, Any]:
    """Each fine-tuned model against its λ = 0 control (same weights, steps, rate and seed: the difference is
    ``L_R``'s alone), also written to ``eval/<net>/compare-<model>-vs-control.{md,json}``, and, with a second
    seed, the training's own noise: the first seed's control against each later seed's control (and the
    fine-tuned models likewise), per cell (:func:`seed_summary`)."""
    ft = settings["finetuned"]
    pairs = []
    for label, lam, seed in finetuned_models(ft):
        if lam == 0:
            continue
        control = label.replace(FINETUNED, CONTROL, 1)
        labels = (f"control λ=0{_seed_text(seed)}", f"fine-tuned λ={lam:g}{_seed_text(seed)}")
        pair = {
            "seed": seed,
            "model": label,
            "control": control,
            **_versus(results[control], results[label], labels, settings),
        }
        write_comparison(
            results[control],
            results[label],
            out / "eval" / net,
            labels=(control, label),
            name=f"compare-{label}-vs-control",
            reports=False,
        )
        pairs.append(pair)
    entry: dict[str, Any] = {"lam": ft["lam"], "pairs": pairs, "seed_noise": []}
    ci = settings["evaluate"]["ci"]
    for later in pairs[1:]:
        first = pairs[0]
        noise: dict[str, Any] = {
            "seeds": [first["seed"], later["seed"]],
            "control": compare_results(results[first["control"]], results[later["control"]], ci=ci),
            "fine-tuned": compare_results(results[first["model"]], results[later["model"]], ci=ci),
        }
        noise["summary"] = seed_summary(first["comparison"], later["comparison"], noise["control"])
        entry["seed_noise"].append(noise)
    return entry


def _seed_text(seed: int | None) -> str:
    return "" if seed is None else f", seed {seed}"


def seed_summary(
    effect_a: Mapping[str, Any], effect_b: Mapping[str, Any], control_noise: Mapping[str, Any]
) -> dict[str, Any]:
    """How well ``L_R``'s effect on each cell replicates across two fine-tuning seeds, against the training's
    own noise. ``effect_a``/``effect_b``: each seed's comparison of its fine-tuned model with its control
    (:func:`igrad.evaluate.compare_results`, paired); ``control_noise``: the two seeds' controls compared (λ = 0
    both: any difference is the seed's). Returns, over the cells: ``cells``; ``same_sign`` (the two effects'
    mean per-image differences have the same non-zero sign); ``replicated`` (both significant, same sign);
    ``noise_max``/``noise_median`` (|control difference|, metric units); ``noise_significant`` (control cells
    whose paired interval excludes 0); ``beyond_noise`` (cells where both effects are larger in magnitude than
    that cell's control difference, with the same sign)."""
    rows = []
    for method, per in effect_a["methods"].items():
        for k, cell in per.items():
            other = effect_b["methods"][method][k]
            noise = control_noise["methods"][method][k]
            rows.append((cell, other, noise))
    if not rows or any("difference" not in c for row in rows for c in row):
        raise IgradError("the seed summary needs paired comparisons (the same images for every model)")
    a = [r[0]["difference"]["mean"] for r in rows]
    b = [r[1]["difference"]["mean"] for r in rows]
    n = [abs(r[2]["difference"]["mean"]) for r in rows]
    same = [x * y > 0 for x, y in zip(a, b, strict=True)]
    return {
        "cells": len(rows),
        "same_sign": sum(same),
        "replicated": sum(s and r[0]["significant"] and r[1]["significant"] for s, r in zip(same, rows, strict=True)),
        "noise_max": max(n),
        "noise_median": statistics.median(n),
        "noise_significant": sum(bool(r[2]["significant"]) for r in rows),
        "beyond_noise": sum(s and min(abs(x), abs(y)) > m for s, x, y, m in zip(same, a, b, n, strict=True)),
    }


def _versus(
    base: Mapping[str, Any], other: Mapping[str, Any], labels: tuple[str, str], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """One model (``other``) against a reference (``base``: the baseline, or a fine-tuned model's control): the
    comparison, the cells won, the accuracies' statistics and the reproduction table (docs/method.md) (columns headed
    ``labels``)."""
    comparison = compare_results(base, other, ci=settings["evaluate"]["ci"])
    return {
        "comparison": comparison,
        "wins": _wins(comparison),
        "accuracy": accuracy_statistics(_model_row(base), _model_row(other)),
        "table": compare_table(base, other, labels=labels, ci=settings["evaluate"]["ci"]),
    }


class _Prefixed:
    """A text stream that writes each line to ``stream`` with ``prefix`` in front (the side-by-side children's
    epoch lines say which model they are about)."""

    def __init__(self, stream: Any, prefix: str) -> None:
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.stream.write(f"{self.prefix}{line}\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        """Write an unfinished line too (at the end of the child), then flush the stream."""
        if self.pending:
            self.stream.write(f"{self.prefix}{self.pending}")
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)  # isatty, encoding, fileno, ...: the stream's


def _train_child(values: dict[str, Any], label: str) -> None:
    """A child process of :func:`_side_by_side`: train one config (reusing or resuming its folder); its
    epoch lines go to stdout prefixed with ``[label]``."""
    import contextlib

    prefixed = _Prefixed(sys.stdout, f"[{label}] ")
    try:
        with contextlib.redirect_stdout(prefixed):
            fit_or_resume(TrainConfig.from_dict(values), quiet=True)
    finally:
        prefixed.flush()


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """Initializer of :func:`_side_by_side`'s worker processes: end this process within ``interval_s``
    of its parent ``parent``'s end. A parent killed with SIGTERM or SIGKILL runs no cleanup and would leave
    its children training on, unseen, and racing a resumed run for the same run folders (torch's DataLoader
    workers guard against the same with a watchdog on ``os.getppid``). The trainer writes its checkpoints
    atomically, so ending mid-epoch leaves the last finished epoch's to resume from."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="igrad-parent-watchdog", daemon=True).start()


def _evaluate_child(values: dict[str, Any], label: str, ev: dict[str, Any], stored: str, data: str) -> None:
    """A child process of :func:`_side_by_side`: evaluate the finished run of ``values`` with settings ``ev`` on
    the test split into ``stored`` (reused there when already made with these settings and weights), for the
    parent to reuse."""
    import contextlib

    config = TrainConfig.from_dict(values)
    if not _finished(config):  # an evaluation process trains nothing (its run would race its dependants)
        raise IgradError(f"cannot evaluate {config.out}: its training has not finished")
    if config.threads:
        torch.set_num_threads(config.threads)
    prefixed = _Prefixed(sys.stdout, f"[{label}] ")
    try:
        with contextlib.redirect_stdout(prefixed):
            run = fit_or_resume(config, quiet=True)  # finished: its final weights, nothing trained
            test = prepare_data(config.replace(val_fraction=0.0)).test
            started = time.perf_counter()
            _, reused = _evaluate_and_store(run, test, data, ev, Path(stored), progress=False)
            if not reused:
                print(f"evaluated in {(time.perf_counter() - started) / 60:.1f} min")
    finally:
        prefixed.flush()


def _depends_on(configs: Mapping[str, TrainConfig]) -> dict[str, str | None]:
    """For each run, the run whose final weights it starts from (``init`` naming that run's ``last.pt``)."""
    by_checkpoint = {os.path.realpath(Path(c.out) / "last.pt"): label for label, c in configs.items()}
    return {label: by_checkpoint.get(os.path.realpath(c.init)) if c.init else None for label, c in configs.items()}


def _side_by_side(
    configs: Mapping[str, TrainConfig], jobs: int, quiet: bool, evaluation: Mapping[str, Any]
) -> tuple[set[str], set[str]]:
    """Train a network's runs in up to ``jobs`` processes at once, each as soon as the run it starts from has
    finished (the fine-tuned model after the baseline, not after every run), and, per ``evaluation``
    (``{"evaluate": settings, "data": source, "stored": {label: results.json path}}``), evaluate each model in
    a free process as soon as it is trained (only those not stored already with the same settings and
    weights): a freed process takes the next task that can start. Each process runs ``threads`` torch threads
    (when unset: the CPU count divided among the processes). With ``threads`` set,
    the runs are bitwise those trained one after another: each process seeds and trains exactly as
    :func:`igrad.train.fit` does in this one. The children print their lines prefixed with their label; a
    child's error is raised here once the others have ended; a child ends soon after this process does, killed
    or not (:func:`_exit_with_parent`). Nothing is started when fewer than two tasks are needed (the caller
    runs that one, and reuses the rest). Returns the labels trained here and those evaluated here."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    to_train = [label for label, c in configs.items() if not _finished(c)]
    to_evaluate = [
        label for label in configs if label in to_train or _needs_evaluation(configs[label], label, evaluation)
    ]
    if len(to_train) + len(to_evaluate) < 2:  # nothing to run side by side: the caller does it
        return set(), set()
    after = _depends_on(configs)
    workers = min(jobs, len(to_train) + len(to_evaluate))
    threads = max(1, (os.cpu_count() or 1) // workers)
    values = {label: c.replace(threads=c.threads or threads).to_dict() for label, c in configs.items()}
    if not quiet:
        print(f"[reproduce] training {', '.join(to_train)} side by side ({workers} processes)", file=sys.stderr)

    def ready() -> tuple[str, str] | None:
        """The next task whose run (or its starting point) has finished: trainings first (the long pole)."""
        for label in to_train:
            if label not in busy and after[label] not in to_train:
                return "train", label
        for label in to_evaluate:
            if label not in to_train and label not in busy:
                return "evaluate", label
        return None

    busy: set[str] = set()
    trained, evaluated = set(to_train), set[str]()
    running: dict[Future[None], tuple[str, str]] = {}
    errors: list[BaseException] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        while not errors and (to_train or to_evaluate or running):
            while len(running) < workers and (task := ready()) is not None:
                running[_submit(pool, task, values, evaluation)] = task
                busy.add(task[1])
                if task[0] == "evaluate":
                    to_evaluate.remove(task[1])
            if not running:  # pragma: no cover (a config cannot start from its own weights)
                raise IgradError(f"runs that wait on each other: {', '.join(to_train)}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, label = running.pop(future)
                busy.discard(label)
                if (error := future.exception()) is not None:
                    errors.append(error)
                else:
                    (to_train.remove if kind == "train" else evaluated.add)(label)
        # after an error nothing new starts; the pool waits for the running ones, whose errors count too
        errors += [e for f in running if (e := f.exception()) is not None]
    if errors:
        raise errors[0]
    return trained, evaluated


def _submit(
    pool: Any, task: tuple[str, str], values: Mapping[str, dict[str, Any]], evaluation: Mapping[str, Any]
) -> Any:
    """Start ``task`` (``("train" | "evaluate", label)``) of :func:`_side_by_side` in ``pool``."""
    kind, label = task
    if kind == "train":
        return pool.submit(_train_child, values[label], label)
    ev, stored = dict(evaluation["evaluate"]), str(evaluation["stored"][label])
    return pool.submit(_evaluate_child, values[label], label, ev, stored, evaluation["data"])


def _finished(config: TrainConfig) -> bool:
    """Whether ``config.out`` holds a run that needs no more training: its ``run.json`` says it finished, with at
    least ``config.epochs`` epochs (a later call may raise ``epochs``: that run resumes)."""
    path = Path(config.out) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info.get("status") == "finished" and int(info.get("epochs_done") or 0) >= config.epochs
    except (OSError, ValueError, TypeError):
        return False


def _needs_evaluation(config: TrainConfig, label: str, evaluation: Mapping[str, Any]) -> bool:
    """Whether the finished run of ``config`` has no stored evaluation made with these settings and weights."""
    checkpoint = Path(config.out) / "last.pt"
    if not checkpoint.is_file():
        return True
    key = _evaluation_key(checkpoint, evaluation["evaluate"], evaluation["data"])
    return _stored_evaluation(Path(evaluation["stored"][label]), key) is None


def export_weights(checkpoint: str | os.PathLike[str], dest: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the model of a training checkpoint alone to ``dest``: its ``state_dict`` as trained (float32),
    its ``config`` and ``provenance``, no optimiser or resume state, so that ``igrad evaluate --checkpoint
    dest`` evaluates exactly the model the checkpoint holds (:func:`igrad.checkpoint.load_model`). The file's
    bytes depend on the weights and config alone: an unchanged model is not written again. Returns
    ``{"path", "sha256", "bytes"}``."""
    from .checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    dest = Path(dest)
    weights = {"model": state["model"], "config": state["config"], "provenance": state.get("provenance")}
    if dest.is_file():
        if not _same_weights(dest, weights):
            dest.unlink()
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(dest, weights)
    return {"path": str(dest), "sha256": file_sha256(dest), "bytes": dest.stat().st_size}


def _loaded_model(run: Any) -> torch.nn.Module:
    """The model of ``run``'s final weights as :func:`igrad.checkpoint.load_model` loads it (what is evaluated)."""
    from .checkpoint import load_model

    return load_model(Path(run.run_dir) / "last.pt", map_location=device_of(run.model))[0]


def _same_weights(path: Path, weights: Mapping[str, Any]) -> bool:
    """Whether the weights file ``path`` holds ``weights``' config and tensors (unreadable: no)."""
    from .checkpoint import load_checkpoint

    try:
        old = load_checkpoint(path)
    except IgradError:
        return False
    if old["config"] != weights["config"] or old["model"].keys() != weights["model"].keys():
        return False
    return all(torch.equal(old["model"][k], v) for k, v in weights["model"].items())


def _network(
    net: str,
    configs: Mapping[str, TrainConfig],
    settings: Mapping[str, Any],
    data: str,
    out: Path,
    cache: dict[str, TrainData],
    quiet: bool,
    progress: bool,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train (or reuse), evaluate (or reuse) and compare the two models of ``net``: its report entry."""
    entry: dict[str, Any] = {"runs": {}, "trained": {}, "evaluation_reused": {}}
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, torch.nn.Module] = {}
    stored = {label: out / "eval" / net / label / "results.json" for label in configs}
    evaluation = {"evaluate": settings["evaluate"], "data": data, "stored": stored}
    side_trained, side_evaluated = _side_by_side(configs, jobs, quiet, evaluation) if jobs > 1 else (set(), set())
    for label, config in configs.items():
        if not quiet and label not in side_trained:
            print(f"[reproduce] {net} {label} (λ = {config.lam:g}): training", file=sys.stderr)
        run, trained = _train(config, quiet)
        prepared = _test_data(cache, config)
        if not quiet and label not in side_evaluated:
            print(f"[reproduce] {net} {label}: evaluating {run.run_dir / 'last.pt'}", file=sys.stderr)
        res, reused = _evaluate_and_store(
            run, prepared.test, data, settings["evaluate"], stored[label], progress and not quiet
        )
        results[label], models[label] = res, _loaded_model(run)
        entry["trained"][label] = trained or label in side_trained
        entry["evaluation_reused"][label] = reused and label not in side_evaluated
        entry["runs"][label] = _run_row(run, config, res)
        weights = export_weights(Path(run.run_dir) / "last.pt", out / "weights" / net / f"{label}.pt")
        entry["runs"][label]["weights"] = {**weights, "path": str(Path(weights["path"]).relative_to(out))}
    entry.update(_comparison(net, results, models, cache["data"], settings, out))
    return entry


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
    finetuned: Mapping[str, Any] | None = None,
    device: str | None = None,
    quiet: bool = False,
    progress: bool = True,
    command: str | None = None,
    jobs: int = 1,
    runs: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report the baseline and the regularised model of each network (module
    docstring), and the fine-tuned models where the preset has them. ``runs``: the root of the run folders
    (``runs/<network>/<label>``; default ``out/runs``): put long runs outside a checkout that may be replaced,
    and give the same ``runs`` to resume them. ``train``/``evaluation``/``lam``/
    ``figure_images``/``finetuned`` override the preset (:func:`preset_settings`); ``device`` is used for
    training (``TrainConfig.device``) and evaluation;
    ``command`` is the command line recorded in the report; ``jobs`` > 1 runs a network's trainings and
    evaluations in that many processes (on a CPU: one thread each on two cores), each as soon as what it needs
    is there (:func:`_side_by_side`). Returns the content of ``results.json``."""
    started = time.perf_counter()
    data = os.fspath(data)
    out = Path(out)
    train = dict(train or {})
    if device is not None:
        train.setdefault("device", device)
    settings = preset_settings(
        preset, train=train, evaluation=evaluation, lam=lam, figure_images=figure_images, finetuned=finetuned
    )
    nets = _check_networks(networks, settings.get("default_networks") or NETWORKS)
    configs = _run_configs(settings, nets, data, Path(runs) if runs is not None else out / "runs")
    report: dict[str, Any] = {
        "kind": "igrad.reproduce",
        "format": 1,
        "preset": preset,
        "command": _command_line(command, preset, data, out),
        "data": data,
        "lam": settings["lam"],
        "scope": SCOPES.get(preset),
        "settings": settings,
        "networks": {},
    }
    cache: dict[str, TrainData] = {}
    earlier = _earlier_networks(out, preset, settings, data, nets)
    paper_order = {n: i for i, n in enumerate(NETWORKS)}  # then the others as given
    for net in sorted(dict.fromkeys([*nets, *earlier]), key=lambda n: paper_order.get(n, len(NETWORKS))):
        if net in nets:
            entry = _network(net, configs[net], settings, data, out, cache, quiet, progress, jobs)
            report["networks"][net] = entry
            entry["made_by"] = _made_by(report["command"], entry, settings, _this_call())
        else:
            report["networks"][net] = earlier[net]
            if not quiet:
                print(
                    f"[reproduce] {net}: kept from the earlier report in {out} (same preset and settings)",
                    file=sys.stderr,
                )
    return _write(report, out, started, lambda r: reproduce_markdown(r, out))


def _this_call() -> dict[str, Any]:
    """The commit, machine and time of this process, as :func:`igrad.provenance.provenance` records them."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"commit": process_commit(), "machine": machine_info(), "time": now}


def _made_by(
    command: str, entry: Mapping[str, Any], settings: Mapping[str, Any], call: Mapping[str, Any]
) -> dict[str, Any]:
    """What made a network's entry of a reproduction: the command, the precision of its training (its runs'
    ``amp``) and of its evaluation's saliency maps and metrics (``settings["evaluate"]["amp"]``; accuracy and
    cos are float32 either way), and the commit, machine and time of the call (``call``)."""
    amp = {label: bool(run["config"].get("amp")) for label, run in entry["runs"].items()}
    return {
        "command": command,
        "precision": {
            "training": {label: "bf16" if on else "float32" for label, on in amp.items()},
            "evaluation": "bf16" if settings["evaluate"].get("amp") else "float32",
        },
        **{k: call.get(k) for k in ("commit", "machine", "time")},
    }


def _earlier_networks(
    out: Path, preset: str, settings: Mapping[str, Any], data: str, nets: Sequence[str]
) -> dict[str, Any]:
    """The networks of an earlier ``out/results.json`` made with the same preset, settings and data that this
    call does not train: a reproduction can be run one network at a time (say, one per working session, on
    different machines) and still end in one report. Anything else there is replaced. The data is the same
    when both paths name the same folder (relative or absolute, through links); a copy elsewhere is not
    recognised as the same data."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = (
        old.get("kind") == "igrad.reproduce"
        and old.get("preset") == preset
        and _same_folder(old.get("data"), data)
        and _comparable(old.get("settings", {})) == _comparable(json.loads(json.dumps(settings)))
    )
    kept = {net: dict(entry) for net, entry in old.get("networks", {}).items() if net not in nets}
    if not same:
        if kept:
            print(
                f"[reproduce] note: {path} was made with another preset, data or settings; its networks "
                f"{', '.join(kept)} are not carried into the new report",
                file=sys.stderr,
            )
        return {}
    for entry in kept.values():  # a report written before networks said what made them: its call wrote them
        if "made_by" not in entry:
            made = _made_by(old.get("command", "?"), entry, old["settings"], old.get("provenance", {}))
            entry["made_by"] = {**made, "from_report": True}
    return kept


def _same_folder(a: object, b: object) -> bool:
    """Whether two recorded data paths name the same folder (``os.path.realpath`` of both)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without the resource fields (:data:`igrad.train.RESOURCE_FIELDS`) of its training overrides
    (shared and per network) and without the precision (:data:`PRECISION_FIELDS`) of training and evaluation:
    a later session may run on another machine, with or without bf16 units (each network's ``made_by`` records
    its precision). A report made before the fine-tuned model existed had no ``finetuned`` setting; one made
    before the fine-tuned models had λ = 0 controls and seeds is compared on ``lam`` and ``train`` alone (its
    networks are carried without them, and their sections say so)."""
    out = dict(settings)
    ft = out.get("finetuned")
    # a network made before the fine-tuned models had controls and seeds is the same experiment, without them
    out["finetuned"] = {"lam": ft["lam"], "train": ft.get("train", {})} if ft else None
    skip = RESOURCE_FIELDS | PRECISION_FIELDS
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k not in skip}
    out["networks"] = {
        net: {k: v for k, v in values.items() if k not in skip} for net, values in out.get("networks", {}).items()
    }
    out["evaluate"] = {k: v for k, v in out.get("evaluate", {}).items() if k not in PRECISION_FIELDS}
    return out


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
        wins = sum(1 for e in vs.values() if e["better"] == "regularised")
        clear = sum(1 for e in vs.values() if e["better"] == "regularised" and e.get("significant"))
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


def _ablation_settings(
    preset: str,
    train: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    device: str | None,
) -> dict[str, Any]:
    """The preset's settings at its ablation budget (Grad-CAM only); a validation split is required."""
    ab = preset_settings(preset)["ablation"]
    train_over = {**ab["train"], **(train or {})}
    if device is not None:
        train_over.setdefault("device", device)
    settings = preset_settings(
        preset, train=train_over, evaluation={**ab.get("evaluate", {}), **(evaluation or {}), "methods": ["gradcam"]}
    )
    if not settings["train"].get("val_fraction"):
        raise IgradError("the ablation chooses on a validation split: val_fraction must be > 0")
    return settings


def _ablation_grid(lambdas: Sequence[float], errors: Sequence[str] | None) -> list[tuple[float, str]]:
    """``(λ, error)`` pairs: ``λ = 0`` once (the error is then unused), every ``λ > 0`` with every error."""
    errs = list(errors) if errors else list(_loss.ERRORS)
    for e in errs:
        if e not in _loss.ERRORS:
            raise unknown_name("error function", e, _loss.ERRORS)
    grid = [(0.0, errs[0])] if 0.0 in lambdas else []
    return grid + [(float(lam), e) for lam in lambdas if lam != 0 for e in errs]


def _ablation_run(
    config: TrainConfig,
    name: str,
    net: str,
    data: str,
    ev: Mapping[str, Any],
    stored: Path,
    val: Any,
    quiet: bool,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Train one setting (or reuse it) and measure Grad-CAM on the validation split ``val`` (or reuse
    ``stored``). Returns the run and its evaluation (as stored)."""
    if not quiet:
        print(f"[ablation] {net} {name}: training", file=sys.stderr)
    run, _ = _train(config, quiet)
    if not quiet:
        print(f"[ablation] {net} {name}: Grad-CAM on the validation split", file=sys.stderr)
    source = f"{data} (validation split, val_fraction {config.val_fraction})"
    limit = min(ev["limit"], len(val)) if ev["limit"] else None
    res, reused = _evaluate_run(run, val, source, {**ev, "limit": limit}, stored, progress and not quiet)
    if not reused:
        kept = ("model", "data", "settings", "results", "per_sample", "timing", "provenance", "reproduce")
        res = {k: res[k] for k in kept}
        atomic_write_json(stored, res)
    return run, res


def _ablation_row(name: str, lam: float, err: str, run: Any, res: Mapping[str, Any]) -> dict[str, Any]:
    """One setting's line of the ablation table (validation accuracy, cos and Grad-CAM's metrics)."""
    return {
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


def _ablation_network(
    net: str,
    grid: Sequence[tuple[float, str]],
    settings: Mapping[str, Any],
    data: str,
    root: Path,
    quiet: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """The ablation rows of ``net``, each ``λ > 0`` paired against ``λ = 0`` on the same validation images."""
    rows: list[dict[str, Any]] = []
    base_res: dict[str, Any] | None = None
    val = None
    ev = settings["evaluate"]
    for lam, err in grid:
        name = f"lam{lam:g}" if lam == 0 else f"{err}-lam{lam:g}"
        config = train_config(settings, net, data, lam, root / "runs" / net / name).replace(error=err)
        if val is None:  # the same validation split for every setting: prepared once
            val = prepare_data(config).val
        assert val is not None  # val_fraction > 0, checked by _ablation_settings
        run, res = _ablation_run(
            config, name, net, data, ev, root / "eval" / net / f"{name}.json", val, quiet, progress
        )
        rows.append(_ablation_row(name, lam, err, run, res))
        if lam == 0:
            base_res = res
        elif base_res is not None:
            rows[-1]["vs_baseline"] = compare_results(base_res, res, ci=ev["ci"])["methods"]["gradcam"]
    return rows


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
    started = time.perf_counter()
    data = os.fspath(data)
    root = Path(out) / "ablation"
    settings = _ablation_settings(preset, train, evaluation, device)
    grid = _ablation_grid(lambdas, errors)
    nets = _check_networks(networks, NETWORKS[:1])
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
        rows = _ablation_network(net, grid, settings, data, root, quiet, progress)
        report["networks"][net] = {"rows": rows, "chosen": _ablation_choice(rows, acc_margin)}
    return _write(report, root, started, ablation_markdown)
