"""Evaluation of saliency methods on a trained classifier: the tables of docs/method.md §The reproduction table.

:class:`EvalConfig` holds every choice of an evaluation (methods, metrics, subset, target, step,
substrates, score, chunk size, interval, device); :func:`evaluate_model` runs it over a fixed, seeded
subset of a data split, together with the model's top-1 accuracy and the mean ``cos(δx, δᴳx)``
diagnostic, and returns a JSON-ready dict; :func:`evaluate_checkpoint` does the same from a checkpoint
file. Each chunk of images is forwarded once (:func:`igrad.metrics.clean_forward`); finished chunks can
be persisted (``resume_dir``) so that a killed evaluation continues where it stopped.
:func:`compare_results` puts a baseline and a regularised model side by side (AD and deletion: lower
is better). The reports (Markdown, CSV, figures) are written by :mod:`igrad.report`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import pickle
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_save
from .errors import IgradError, unknown_name
from .gradients import gradient_cosine
from .images import MAX_PIXELS, to_unit
from .measure import evaluate_accuracy
from .metrics import (
    METRICS,
    SCORES,
    SUBSTRATES,
    CleanBatch,
    check_scorable,
    clean_forward,
    compute_metrics,
    resolve_metrics,
)
from .normalization import Normalization, resolve_normalization
from .precision import autocast
from .provenance import file_sha256, provenance
from .saliency import resolve_methods
from .stats import holm, paired_p_value, summarize
from .torch_utils import device_of, eval_mode, input_dtype
from .validate import positive_int

__all__ = [
    "TARGET_SOURCES",
    "CIS",
    "EvalConfig",
    "select_indices",
    "evaluate_model",
    "evaluate_checkpoint",
    "compare_results",
]

RESULTS_FORMAT = 1
#: Where the explained (target) class comes from: ``gt`` the ground-truth label (a choice of docs/method.md §Saliency
#: methods), ``pred``
#: the predicted class (the choices of ``EvalConfig.target``).
TARGET_SOURCES = ("gt", "pred")
#: Confidence-interval methods of :func:`igrad.metrics.summarize`.
CIS = ("normal", "bootstrap")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _choice(kind: str, value: object, choices: Iterable[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise unknown_name(kind, str(value), tuple(choices))


@dataclass(frozen=True)
class EvalConfig:
    """Every choice of an evaluation (docs/method.md §Metrics, §The reproduction table): what :func:`evaluate_model`
    measures and how.

    ``methods`` and ``metrics`` are given as ``"all"``, a comma-separated string or names, and stored as
    the resolved tuple of names. Validated on construction (:class:`IgradError` naming the field).
    ``igrad evaluate``'s flags are generated from these fields; :meth:`to_dict` is what a result's
    ``settings`` and the resume key record.
    """

    methods: tuple[str, ...] | str = _f("all", "'all' or comma-separated saliency methods")
    metrics: tuple[str, ...] | str = _f("all", "'all' or comma-separated metrics (ad, ag, ai, ins, del)")
    limit: int | None = _f(None, "evaluate a fixed seeded subset of N images (default: all)")
    seed: int = _f(0, "seed of the subset and of noisy methods")
    target: str = _f("gt", "class explained: the label (gt) or the prediction (pred)")
    step: int | None = _f(None, "insertion/deletion pixels per step (default: the image width)")
    target_layer: str | None = _f(None, "CAM target layer (default: the model's last convolutional stage)")
    insertion_substrate: str = _f("blur", "what insertion starts from (docs/method.md §Metrics: blur)")
    deletion_substrate: str = _f("zero", "what deleted pixels become (docs/method.md: zero, in normalised space)")
    score: str = _f("prob", "score of a curve point (docs/method.md §Metrics: prob, the class softmax probability)")
    batch_size: int = _f(64, "images per chunk: saliency batch, clean forward and metric forwards")
    ci: str = _f("normal", "95%% interval method")
    accuracy: bool = _f(True, "measure the top-1 accuracy over the whole split")
    device: str | None = _f(None, "cpu, cuda, cuda:N for a checkpoint's model (default: cuda when available)")
    amp: bool = _f(False, "bf16 autocast for the saliency methods and the metrics' forwards (accuracy, cos: float32)")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "methods", tuple(resolve_methods(self.methods)))
        set_(self, "metrics", tuple(resolve_metrics(self.metrics)))
        positive_int("limit", self.limit, optional=True)
        positive_int("step", self.step, optional=True)
        positive_int("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise IgradError(f"seed must be an integer, got {self.seed!r}")
        _choice("target", self.target, TARGET_SOURCES)
        _choice("confidence interval", self.ci, CIS)
        _choice("substrate", self.insertion_substrate, SUBSTRATES)
        _choice("substrate", self.deletion_substrate, SUBSTRATES)
        _choice("score", self.score, SCORES)
        for name in ("accuracy", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise IgradError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalConfig:
        """A config from plain values (JSON, a preset, CLI flags); unknown names raise."""
        known = [f.name for f in fields(cls)]
        for name in values:
            if name not in known:
                raise unknown_name("evaluation setting", str(name), known)
        return cls(**dict(values))

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with ``changes`` (checked like :meth:`from_dict`)."""
        return EvalConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (methods and metrics as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["methods"], out["metrics"] = list(self.methods), list(self.metrics)
        return out

    def flags(self) -> list[str]:
        """The ``igrad evaluate`` flags that give these settings: one per field that differs from its default
        (``--name value``, ``--x``/``--no-x`` for booleans, lists comma-joined), the device left out (where
        the command runs is the reader's)."""
        default, flags = EvalConfig().to_dict(), []
        for name, value in self.to_dict().items():
            if name == "device" or value == default[name] or value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else flag.replace("--", "--no-", 1))
            else:
                flags += [flag, ",".join(value) if isinstance(value, list) else str(value)]
        return flags


def select_indices(n_total: int, limit: int | None, seed: int) -> torch.Tensor:
    """The evaluated subset: all ``n_total`` indices, or the first ``limit`` of a permutation seeded
    by ``seed`` (sorted). A smaller ``limit`` with the same seed gives a subset of a larger one."""
    count = positive_int("limit", limit, optional=True)
    if count is None:
        return torch.arange(n_total)
    if count > n_total:
        raise IgradError(f"limit {count} is larger than the data ({n_total} images)")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:count].sort().values


def _seed_for(seed: int, method: str) -> int:
    """A seed per (run seed, method), so a method's numbers do not depend on the others run; not per chunk,
    so that they do not depend on ``batch_size`` either (SmoothGrad seeds each image's noise from this seed
    and the image's values: :func:`igrad.saliency.gradient.noise_seed`)."""
    return (int(seed) * 1_000_003 + zlib.crc32(method.encode()) * 1009) % (2**31 - 1)


def _method_kwargs(cfg: EvalConfig, extra: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Keyword arguments of each method: the chunk size, no progress bar, the CAM layer, ``extra``."""
    from .saliency import METHODS

    kwargs: dict[str, dict[str, Any]] = {}
    for name in cfg.methods:
        accepted = inspect.signature(METHODS[name]).parameters
        kw: dict[str, Any] = {k: v for k, v in (("batch_size", cfg.batch_size), ("progress", False)) if k in accepted}
        if cfg.target_layer is not None and getattr(METHODS[name], "uses_layer", True):
            kw["target_layer"] = cfg.target_layer
        kwargs[name] = {**kw, **(extra or {}).get(name, {})}
    return kwargs


def _saliency(model: nn.Module, name: str, kw: Mapping[str, Any], clean: CleanBatch, seed: int) -> torch.Tensor:
    """Maps of method ``name`` for the chunk, with the method's seed fixed (``seed``) in a forked RNG."""
    from .saliency import METHODS, create_method

    if "seed" in inspect.signature(METHODS[name]).parameters and "seed" not in kw:
        kw = {**kw, "seed": seed}
    device = clean.x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with create_method(name, model, **kw) as m:
            return m(clean.x, clean.target).detach()


def _evaluate_chunk(
    model: nn.Module,
    clean: CleanBatch,
    labels: torch.Tensor,
    cfg: EvalConfig,
    kwargs: Mapping[str, Mapping[str, Any]],
    bar: Any,
) -> dict[str, Any]:
    """One chunk: its single clean forward is ``clean``; cos (float32), then each method's maps and metrics
    (in bf16 autocast with ``cfg.amp``). Returns plain tensors (per-sample values, the chunk's curve sums),
    as persisted for resuming."""
    check_scorable(clean, cfg.metrics, cfg.score)  # before any method runs
    part: dict[str, Any] = {
        "target": clean.target.cpu(),
        "correct": int((clean.logits.argmax(1) == labels).sum()),
        "cos": gradient_cosine(model, clean.x, clean.target).detach().float().cpu(),
        "values": {},
        "curve_sums": {},
        "seconds": {},
    }
    for name in cfg.methods:
        bar.set_postfix_str(name)  # shown now: the method running, not the last one of the chunk
        t0 = time.perf_counter()
        with autocast(clean.x.device, cfg.amp):
            maps = _saliency(model, name, kwargs[name], clean, _seed_for(cfg.seed, name))
        t1 = time.perf_counter()
        try:
            with autocast(clean.x.device, cfg.amp):
                res = compute_metrics(
                    model,
                    clean,
                    maps,
                    metrics=cfg.metrics,
                    step=cfg.step,
                    batch_size=cfg.batch_size,
                    substrates=(cfg.insertion_substrate, cfg.deletion_substrate),
                    score=cfg.score,
                )
        except IgradError as exc:
            raise IgradError(f"method {name!r}: {exc}") from exc
        part["seconds"][name] = {"saliency": t1 - t0, "metrics": time.perf_counter() - t1}
        part["values"][name] = dict(res.values)
        part["curve_sums"][name] = {k: cv.double().sum(0) for k, cv in res.curves.items()}
    return part


class _Partials:
    """Finished chunks of one evaluation, persisted atomically in ``root/<key>/`` (``key``: a hash of
    everything the numbers depend on, so different arguments never mix); removed when it completes."""

    def __init__(self, root: Path | None, key: str) -> None:
        self.dir = None if root is None else Path(root) / key[:24]
        self.resumed = 0

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The stored value ``name``, or ``compute()`` stored atomically."""
        if self.dir is None:
            return compute()
        path = self.dir / f"{name}.pt"
        if path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
                self.resumed += 1
                return value
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
                pass  # unreadable: compute it again
        value = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_save(value, path)
        return value

    def remove(self) -> None:
        """Delete this evaluation's stored chunks, and the ``.partial`` folder once nothing else is in it."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # other evaluations' chunks still there: keep it
                self.dir.parent.rmdir()


def _fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON values and tensors (bytes, dtype, shape), in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _resume_key(
    model: nn.Module, split: Any, indices: torch.Tensor, cfg: EvalConfig, norm: Normalization, extra: Any
) -> str:
    """What the numbers depend on: the model's weights, the evaluated images and labels, the settings,
    the normalisation, the methods' extra arguments and the device."""
    state = [t for _, t in sorted(model.state_dict().items())]
    return _fingerprint(
        cfg.to_dict(),
        norm.to_config(),
        extra,
        str(device_of(model)),
        len(split),
        split.images[indices],
        split.labels[indices],
        *state,
    )


def evaluate_model(
    model: nn.Module,
    split: Any,
    settings: EvalConfig | None = None,
    *,
    normalization: Normalization | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    source: str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    resume_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callable[[int], None]] = (),
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate saliency methods with metrics on ``split`` (an :class:`igrad.data.Split` whose labels are
    the model's class indices: :func:`igrad.data.match_classes` renumbers a folder's), on the model's device.

    ``settings`` (:class:`EvalConfig`, default all fields' defaults) with ``overrides`` (its field names,
    e.g. ``methods="gradcam"``); ``normalization`` the model's (or ``mean``/``std``); ``config``: the
    training config, recorded; ``method_kwargs``: extra arguments per method. Images are the seeded
    subset :func:`select_indices` ``(len(split), limit, seed)``, processed ``batch_size`` at a time:
    one clean forward per chunk (:func:`igrad.metrics.clean_forward` on the raw pixels: logits,
    target, ``p``), cos, then each method's maps and metrics. Target class: the label (``gt``) or the
    prediction (``pred``). Each metric is summarised by :func:`summarize` (mean, ``ci`` interval, N);
    the mean insertion/deletion curves and per-sample values are kept. With ``accuracy`` the top-1
    accuracy is measured on the whole split. With ``resume_dir`` each finished chunk (and the accuracy)
    is stored there atomically, keyed by everything the numbers depend on; a killed call started again
    continues from them and returns the same numbers; the stored chunks are removed at the end.
    ``callbacks``: functions called with the chunk's index once it is done (and stored), in order.
    With ``amp`` the clean forward, the methods and the metrics' forwards run in bf16 autocast
    (:func:`igrad.precision.autocast`); scores, maps and metric arithmetic stay float32, and so do the
    accuracy and cos (what the model is, whatever the precision of its explanations); ``settings["precision"]``
    records it.
    """
    cfg = EvalConfig.from_dict({**(settings.to_dict() if settings is not None else {}), **overrides})
    norm = resolve_normalization(normalization, mean, std)
    if len(split) == 0:
        raise IgradError("the data split is empty")
    indices = select_indices(len(split), cfg.limit, cfg.seed)
    device = device_of(model)
    kwargs = _method_kwargs(cfg, method_kwargs)
    partials = _Partials(
        None if resume_dir is None else Path(resume_dir),
        _resume_key(model, split, indices, cfg, norm, method_kwargs) if resume_dir is not None else "",
    )
    started = time.perf_counter()
    acc = None
    if cfg.accuracy:
        acc = partials.get(
            "accuracy",
            lambda: evaluate_accuracy(model, split, norm, batch_size=cfg.batch_size * 4, device=device),
        )
    parts = _run_chunks(model, split, indices, cfg, norm, kwargs, partials, callbacks, progress)
    results = _results(parts, split, indices, cfg, norm, acc, config, source)
    results["timing"] = {
        "total_s": time.perf_counter() - started,
        "method_s": {
            m: {k: sum(p["seconds"][m][k] for p in parts) for k in ("saliency", "metrics")} for m in cfg.methods
        },
        "device": str(device),
        "resumed_parts": partials.resumed,
    }
    partials.remove()
    return results


def _run_chunks(
    model: nn.Module,
    split: Any,
    indices: torch.Tensor,
    cfg: EvalConfig,
    norm: Normalization,
    kwargs: Mapping[str, Mapping[str, Any]],
    partials: _Partials,
    callbacks: Sequence[Callable[[int], None]],
    progress: bool,
) -> list[dict[str, Any]]:
    """Every chunk of ``indices`` in order (:func:`_evaluate_chunk` on one clean forward of its raw pixels),
    each taken from ``partials`` when stored there, else computed and stored; ``callbacks`` after each."""
    from tqdm.auto import tqdm

    device, dtype = device_of(model), input_dtype(model)
    parts = []
    bar = tqdm(
        total=len(indices) * len(cfg.methods), unit="img", desc="evaluate", disable=not progress, dynamic_ncols=True
    )
    with bar, eval_mode(model):
        for chunk, lo in enumerate(range(0, len(indices), cfg.batch_size)):
            idx = indices[lo : lo + cfg.batch_size]

            def compute(idx: torch.Tensor = idx) -> dict[str, Any]:
                labels = split.labels[idx].to(device)
                with autocast(device, cfg.amp):  # the metrics' clean points in their forwards' precision
                    clean = clean_forward(
                        model,
                        to_unit(split.images[idx].to(device)).to(dtype),  # float64 for a float64 model
                        labels if cfg.target == "gt" else None,
                        normalization=norm,
                        pixels="raw",
                        batch_size=cfg.batch_size,
                    )
                return _evaluate_chunk(model, clean, labels, cfg, kwargs, bar)

            parts.append(partials.get(f"chunk-{chunk:05d}", compute))
            for callback in callbacks:
                callback(chunk)
            bar.update(len(idx) * len(cfg.methods))
    return parts


#: What a result's ``settings["precision"]`` records.
_PRECISION = {
    False: "float32",
    True: "bf16 autocast (saliency forwards/backwards, metric forwards); float32 scores, maps, metrics, accuracy, cos",
}


def _results(
    parts: Sequence[Mapping[str, Any]],
    split: Any,
    indices: torch.Tensor,
    cfg: EvalConfig,
    norm: Normalization,
    acc: float | None,
    config: Mapping[str, Any] | None,
    source: str | None,
) -> dict[str, Any]:
    """The results dict of :func:`evaluate_model` from its chunks (in order)."""
    n = len(indices)
    cos = torch.cat([p["cos"] for p in parts])
    values = {m: {k: torch.cat([p["values"][m][k] for p in parts]) for k in cfg.metrics} for m in cfg.methods}
    curve_sums: dict[str, dict[str, Any]] = {m: {} for m in cfg.methods}
    for p in parts:
        for m, d in p["curve_sums"].items():
            for k, s in d.items():
                curve_sums[m][k] = curve_sums[m].get(k, 0) + s
    h, w = split.images.shape[-2:]
    step_px = w if cfg.step is None else cfg.step
    ci, seed = cfg.ci, cfg.seed
    settings = {**cfg.to_dict(), "step": step_px, "n_steps": math.ceil(h * w / step_px), "ci_level": 0.95}
    settings["precision"] = _PRECISION[cfg.amp]
    settings.update(norm.to_config())
    return {
        "kind": "igrad.evaluate",
        "format": RESULTS_FORMAT,
        "model": {
            "name": (config or {}).get("model"),
            "model_kwargs": (config or {}).get("model_kwargs"),
            "accuracy": acc,
            "accuracy_n": len(split) if cfg.accuracy else None,
            "subset_accuracy": sum(p["correct"] for p in parts) / n,
            "cos": summarize(cos, ci=ci, seed=seed),
        },
        "data": {
            "source": source,
            "n_total": len(split),
            "n": n,
            "limit": cfg.limit,
            "seed": seed,
            "image_size": [int(h), int(w)],
            "indices": indices.tolist(),
        },
        "settings": settings,
        "metrics": {
            k: {"title": METRICS[k].title, "higher_is_better": METRICS[k].higher_is_better} for k in cfg.metrics
        },
        "results": {m: {k: summarize(v, ci=ci, seed=seed) for k, v in d.items()} for m, d in values.items()},
        "curves": {m: {k: (s / n).tolist() for k, s in d.items()} for m, d in curve_sums.items()},
        "per_sample": {
            "target": torch.cat([p["target"] for p in parts]).tolist(),
            "cos": cos.tolist(),
            "methods": {m: {k: v.tolist() for k, v in d.items()} for m, d in values.items()},
        },
        "provenance": provenance(config, seed),
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | None = None,
    settings: EvalConfig | None = None,
    *,
    split: str = "test",
    progress: bool = True,
    resume_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callable[[int], None]] = (),
    max_pixels: int = MAX_PIXELS,
    **overrides: Any,
) -> dict[str, Any]:
    """:func:`evaluate_model` for a checkpoint (:func:`igrad.checkpoint.load_model`): the model on
    ``settings.device`` (default: cuda when available), its normalisation
    (:meth:`Normalization.from_config`) and, unless ``data`` is given, ``config["data"]``. The data's
    labels are matched to the checkpoint's classes by name (:func:`igrad.data.match_classes`), so
    ``data`` may hold any subset of them; an image file declaring more than ``max_pixels`` pixels is refused
    before decoding (:func:`igrad.data.load_split`). ``overrides``: :class:`EvalConfig` fields."""
    from .checkpoint import load_model
    from .data import load_split, match_classes

    cfg = EvalConfig.from_dict({**(settings.to_dict() if settings is not None else {}), **overrides})
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, config = load_model(checkpoint, map_location=device)
    source = data if data is not None else config.get("data")
    if source is None:
        raise IgradError(f"checkpoint {checkpoint} does not name its data set; pass --data")
    norm = Normalization.from_config(config, f"checkpoint {checkpoint}")
    data_split = match_classes(
        load_split(source, split, max_pixels=max_pixels),
        config.get("classes"),
        int(config["num_classes"]),
        source=f"the {split} split of {source}",
        model=f"checkpoint {checkpoint}",
    )
    results = evaluate_model(
        model,
        data_split,
        cfg,
        normalization=norm,
        config=config,
        source=str(source),
        progress=progress,
        resume_dir=resume_dir,
        callbacks=callbacks,
    )
    results["data"]["split"] = split
    results["checkpoint"] = {"path": str(checkpoint), "sha256": file_sha256(Path(checkpoint))}
    return results


# --------------------------------------------------------------------------------------------------
# baseline vs regularised


def compare_results(
    baseline: Mapping[str, Any], regularised: Mapping[str, Any], *, ci: str = "normal"
) -> dict[str, Any]:
    """Per method and metric: both means, which is better (``"baseline"``, ``"regularised"`` or ``"tie"``;
    AD and deletion lower is better) and, when both ran on the same images, the paired difference
    ``regularised − baseline`` with its 95% interval (``significant`` when the interval excludes 0) and
    the two-sided p-value of the normal test (``p``, :func:`igrad.stats.paired_p_value`; with ``ci="normal"`` it
    agrees with the interval, with ``"bootstrap"`` the interval is the bootstrap's and may differ), and
    ``holm_significant``: still significant at 5 % after Holm's correction over all the method × metric
    cells of this comparison (:func:`igrad.stats.holm`)."""
    paired = baseline["data"]["indices"] == regularised["data"]["indices"]
    out: dict[str, Any] = {"paired": paired, "methods": {}}
    model = {}
    for key in ("accuracy", "cos"):  # higher is better for both
        b = baseline["model"][key]
        o = regularised["model"][key]
        bv = b["mean"] if isinstance(b, Mapping) else b
        ov = o["mean"] if isinstance(o, Mapping) else o
        model[key] = {"baseline": bv, "regularised": ov, "better": _better(bv, ov, True)}
    if paired:
        diff = torch.tensor(regularised["per_sample"]["cos"]) - torch.tensor(baseline["per_sample"]["cos"])
        model["cos"]["difference"] = summarize(diff, ci=ci)
    out["model"] = model
    for m, d in regularised["results"].items():
        if m not in baseline["results"]:
            continue
        out["methods"][m] = {}
        for k, s in d.items():
            if k not in baseline["results"][m]:
                continue
            hib = METRICS[k].higher_is_better
            entry = {"baseline": baseline["results"][m][k]["mean"], "regularised": s["mean"], "higher_is_better": hib}
            entry["better"] = _better(entry["baseline"], entry["regularised"], hib)
            if paired:
                a = torch.tensor(baseline["per_sample"]["methods"][m][k], dtype=torch.float64)
                b = torch.tensor(regularised["per_sample"]["methods"][m][k], dtype=torch.float64)
                paired_diff = summarize(b - a, ci=ci)
                lo, hi = paired_diff["ci_low"], paired_diff["ci_high"]
                entry["difference"] = paired_diff
                entry["significant"] = lo is not None and hi is not None and (lo > 0 or hi < 0)
                entry["p"] = paired_p_value(b - a) if len(a) >= 2 else None
            out["methods"][m][k] = entry
    if paired:  # Holm's correction over every method × metric cell of the comparison
        cells = [e for per_method in out["methods"].values() for e in per_method.values() if e.get("p") is not None]
        for e, rejected in zip(cells, holm([e["p"] for e in cells]), strict=True):
            e["holm_significant"] = rejected
    return out


def _better(base: float | None, regularised: float | None, higher_is_better: bool) -> str | None:
    if base is None or regularised is None:
        return None
    if base == regularised:
        return "tie"
    return "regularised" if (regularised > base) == higher_is_better else "baseline"
