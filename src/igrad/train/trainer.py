"""The trainer (docs/method.md §The loss, §Networks and recipes): :func:`fit` trains with the interpretable-gradient
loss ``L = L_C + λ L_R``.

One call, :func:`fit`, trains any registered network on CIFAR-10/100 (torchvision) or an image folder
(``train/`` and ``test/`` or ``val/``), held in memory as uint8 tensors (uint16 for 16-bit images;
:func:`igrad.data.load_split`).
Per step, on a global batch ``B`` of training images:

* augmentation, per sample (docs/method.md §Networks and recipes): ``RandomCrop(H, padding=4)`` (zero fill), horizontal
flip with
  probability 1/2, ``RandomRotation(15)`` (nearest, zero fill); then ``x = (raw/255 − mean) / std``;
* ``L_C`` the cross-entropy of the training-mode logits; ``L_R`` from
  :class:`igrad.GradientAlignmentLoss` (not computed at all when ``λ = 0``);
  ``L = L_C + λ_eff L_R``; SGD step; the learning rate follows the schedule per step, and so does
  ``λ_eff`` with a λ warm-up (:func:`lam_factor`; without one ``λ_eff = λ``).

Fine-tuning (``config.init``, :mod:`~igrad.train.finetune`): the model starts from a trained igrad
checkpoint's weights; optimiser, schedules and step count start fresh.

After each epoch: accuracy on the test split (and on the validation split when ``val_fraction > 0``)
and the mean eval-mode ``cos(δx, δᴳx)`` (:func:`igrad.gradient_cosine`, ground-truth class) on a fixed
subset of ``cos_samples`` test images. Files of a run folder (only rank 0 writes, always atomically):

* ``config.toml``: the effective config (reload with ``igrad train --config``);
* ``metrics.jsonl``: one JSON object per epoch (keys in :data:`METRIC_KEYS`);
* ``run.json``: summary, status, provenance and ``sessions``: each process that trained the run (a resumed
  run has several), with the commit of the code it ran, when it started, from which epoch and step, its device,
  CPU model and threads;
* ``last.pt`` (every epoch, and every ``checkpoint_every`` steps) and ``best.pt`` (highest validation
  accuracy, or test accuracy without a validation split), in the format of :mod:`igrad.checkpoint`.

Resuming (``fit(config, resume=RUN_DIR)``) restores model, optimiser, scheduler, RNG states and the
position inside the epoch. All randomness of a step (data order, augmentation, dropout) is derived
from ``(seed, epoch, step, rank)``, so a resumed run ends with the same weights as an uninterrupted
one, and two CPU runs of the same config give identical logs (the ``time`` fields aside).
A NaN or infinite loss (or weight) stops the run with :class:`NonFiniteLossError` naming the step,
before that step's update, leaving the last good checkpoint in place. ``fit(..., callbacks=[...])``
calls each callback with a :class:`StepInfo` after every optimiser step.

Several processes: ``torchrun --nproc_per_node=N -m igrad train ...``. Each global batch is split
between the ranks (rank ``r`` takes samples ``r, r+N, ...``; ``batch_size`` is the global batch),
DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU), BatchNorm running
statistics are broadcast from rank 0 before each evaluation, and evaluation is sharded.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_json, atomic_write_text
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import cos_subset, eval_tensors
from ..errors import IgradError
from ..gradients import gradient_cosine
from ..loss import GradientAlignmentLoss, training_forward
from ..measure import correct_count, gradient_cosine_sum
from ..models import create_model
from ..output import model_logits
from ..precision import autocast, to_channels_last
from ..provenance import cpu_model, file_sha256, git_commit, provenance
from ..torch_utils import eval_mode
from .augment import augment
from .config import RESUME_OVERRIDES, TrainConfig, config_to_toml, prepare_data, saved_config
from .distributed import Dist, select_device
from .finetune import InitWeights, load_init, match_data_classes

__all__ = [
    "METRIC_KEYS",
    "RunResult",
    "StepInfo",
    "NonFiniteLossError",
    "fit",
    "fit_or_resume",
    "lr_factor",
    "lam_factor",
]

#: Keys of each line of ``metrics.jsonl`` (``val_*`` only with a validation split).
METRIC_KEYS = (
    "epoch",
    "step",
    "lr",
    "lam",
    "loss",
    "l_c",
    "l_r",
    "train_acc",
    "samples",
    "test_acc",
    "cos",
    "val_acc",
    "val_cos",
    "time",
    "train_time",
    "elapsed",
)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) as a fraction of ``config.lr``.

    Linear warm-up ``(step + 1) / W`` over the first ``W = warmup_epochs · steps_per_epoch`` steps, times
    ``multistep``: ``gamma^(number of milestones ≤ epoch)``, ``epoch = step / steps_per_epoch``;
    ``cosine``: ``(1 + cos(π t / T)) / 2`` with ``t = step − W``, ``T = epochs · steps_per_epoch − W``;
    ``constant``: 1.
    """
    warm = round(config.warmup_epochs * steps_per_epoch)
    factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if config.schedule == "multistep":
        epoch = step / steps_per_epoch
        factor *= config.gamma ** sum(1 for m in config.milestones if m <= epoch)
    elif config.schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch - warm)
        t = min(max(step - warm, 0), total)
        factor *= 0.5 * (1 + math.cos(math.pi * t / total))
    return factor


def lam_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """λ at optimiser step ``step`` (0-based, counted over the whole run) as a fraction of ``config.lam``.

    With ``W = lam_warmup · steps_per_epoch`` steps of warm-up (not rounded): ``min(1, step / W)``, so the
    first step has ``λ_eff = 0`` and every step from ``W`` on the full λ; 1 without warm-up. A step with
    ``λ_eff = 0`` still computes the regulariser, with weight 0 (not skipped: every step takes the same
    passes and logs its ``L_R``; only the first step of a warm-up has weight 0, so skipping would save
    nothing worth a second code path).
    """
    warm = config.lam_warmup * steps_per_epoch
    return min(1.0, step / warm) if warm > 0 else 1.0


class NonFiniteLossError(IgradError):
    """The training loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class RunResult:
    """What :func:`fit` returns: the trained model (unwrapped, eval mode), the per-epoch history and
    the run folder."""

    run_dir: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    model: nn.Module
    best: dict[str, Any]
    #: the processes that trained the run, in order (:meth:`_Trainer.sessions`): each one's commit, start
    #: time, the epoch and step it started from, its device, CPU model and threads
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def test_acc(self) -> float:
        return float(self.final.get("test_acc", float("nan")))

    @property
    def cos(self) -> float:
        return float(self.final.get("cos", float("nan")))

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: final metrics, best epoch, run folder."""
        return {
            "run_dir": str(self.run_dir),
            "epochs": len(self.history),
            "final": dict(self.final),
            "test_acc": self.test_acc,
            "cos": self.cos,
            "val_acc": self.final.get("val_acc"),
            "best": dict(self.best),
        }


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, platform independent)."""
    a, b = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return (int(a) << 31 ^ int(b)) & 0x7FFF_FFFF_FFFF_FFFF


_AUG, _DROPOUT, _ORDER, _SUBSET = 1, 2, 3, 4


def _default_out(config: TrainConfig) -> str:
    name = config.model.replace(":", "-").replace("/", "-")
    width = f"-w{config.width:g}" if config.width is not None else ""
    warm = f"-warm{config.lam_warmup:g}" if config.lam_warmup else ""
    tuned = "-ft" if config.init else ""
    return str(Path("runs") / f"{name}{width}{tuned}-lam{config.lam:g}{warm}-seed{config.seed}")


@dataclass(frozen=True)
class StepInfo:
    """Where a run is, passed to :func:`fit`'s ``callbacks`` after every optimiser step: ``epoch`` (0-based)
    and ``step`` (1-based count of steps done in it) of ``steps_per_epoch``, ``global_step`` (steps done in
    all), ``lr`` (the rate of that step), and ``run_dir``."""

    epoch: int
    step: int
    steps_per_epoch: int
    global_step: int
    lr: float
    run_dir: Path


#: A callback of :func:`fit`: called with a :class:`StepInfo` after each optimiser step (and after the
#: mid-epoch checkpoint of that step, if any), on every process.
StepCallback = Callable[[StepInfo], None]


def _check_same_init(init: str, sha256: str | None, run_dir: Path) -> None:
    """A resumed fine-tuning run's ``init`` file, where it exists, must still be the file it started from."""
    path = Path(init)
    if sha256 is None or not path.is_file():
        return
    now = file_sha256(path)
    if now != sha256:
        raise IgradError(
            f"cannot resume the run in {run_dir}: it was fine-tuned from {init} with SHA-256 {sha256[:12]}..., "
            f"but that file is now {now[:12]}... (retrained or replaced); train the fine-tuning run again in a "
            "new folder"
        )


class _Trainer:
    def __init__(self, config: TrainConfig, dist: Dist, quiet: bool, callbacks: Sequence[StepCallback] = ()) -> None:
        self.config = config
        self.dist = dist
        self.quiet = quiet
        self.callbacks = tuple(callbacks)
        self.device = select_device(config.device, dist)

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, state: dict[str, Any] | None, run_dir: Path | None) -> None:
        c = self.config
        if state is not None and run_dir is not None:
            self.run_dir = run_dir
        else:
            self.run_dir = Path(c.out or _default_out(c))
            if (self.run_dir / "last.pt").exists():
                raise IgradError(
                    f"run folder {self.run_dir} already holds a run (last.pt); continue it with "
                    f"--resume {self.run_dir}, or choose another --out"
                )
        init = self._prepare_init_and_data(state)
        d = self.data
        self.num_classes = len(d.classes)
        torch.manual_seed(c.seed)
        model = create_model(c.model, num_classes=self.num_classes, **c.model_kwargs)
        if init is not None:
            init.load_into(model)
        model = model.to(self.device)
        self.model = to_channels_last(model) if c.channels_last else model
        self.criterion = (
            GradientAlignmentLoss(c.error, stats=c.stats, allow=c.allow, fraction=c.reg_fraction, score=c.reg_score)
            if c.lam > 0
            else None
        )
        self._preflight()
        n = len(d.train)
        if c.batch_size < self.dist.world:
            raise IgradError(f"batch_size {c.batch_size} is smaller than the number of processes {self.dist.world}")
        steps = math.ceil(n / c.batch_size)
        if n - (steps - 1) * c.batch_size < self.dist.world:
            steps -= 1  # a last batch too small to give every process a sample is dropped
        if steps < 1:
            raise IgradError(f"the training split has {n} images, too few for a batch of {c.batch_size}")
        self.steps_per_epoch = min(steps, c.steps_per_epoch) if c.steps_per_epoch else steps
        # on a GPU the uint8 training images (150 MB for CIFAR) live there, and are augmented there
        small = d.train.images.numel() <= 2**31
        self.images = d.train.images.to(self.device) if self.device.type == "cuda" and small else d.train.images
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.config, self.steps_per_epoch)
        )
        self.cos_index = cos_subset(len(d.test), c.cos_samples, c.split_seed)
        self.val_cos_index = cos_subset(len(d.val), c.cos_samples, c.split_seed) if d.val is not None else None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums = torch.zeros(5, dtype=torch.float64)  # Σ loss·n, Σ L_C·n, Σ L_R·n, correct, n
        self.last_lr = c.lr * lr_factor(0, c, self.steps_per_epoch)  # rate of the latest step (for the log)
        self.last_lam = c.lam * lam_factor(0, c, self.steps_per_epoch)  # λ_eff of the latest step (for the log)
        self.elapsed = 0.0  # seconds of training before this process (resumed runs)
        self._since = time.perf_counter()
        self.saved = "no checkpoint had been written yet"
        if state is not None:
            self._restore(state)
        self.session: dict[str, Any] = {
            "commit": git_commit(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "from_epoch": self.epoch,
            "from_step": self.global_step,
            "device": str(self.device),
            "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "world_size": self.dist.world,
        }
        self.earlier_sessions = _earlier_sessions(state, self.session)
        self.ddp: nn.Module = self.model
        if self.dist.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def release_ddp(self) -> None:
        """Free the ``DistributedDataParallel`` wrapper now (training goes on with ``self.model`` only).

        Its C++ reducer holds a reference to the process group, and the wrapper sits in reference cycles,
        so without a collection it would be freed at an arbitrary later moment: after the group is
        destroyed, or during interpreter shutdown, where tearing a gloo backend down can abort the
        process ("terminate called without an active exception", seen on rank 1 of the torchrun test).
        Collecting here makes every training process drop its share of the group before
        :meth:`Dist.close` and before ``fit`` returns."""
        ddp = getattr(self, "ddp", None)  # absent when setup failed before wrapping
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            self.ddp = ddp.module
            del ddp
            gc.collect()

    def _prepare_init_and_data(self, state: dict[str, Any] | None) -> InitWeights | None:
        """The run's data (``self.data``) and, for a new fine-tuning run, the weights to start from. A resumed
        (or reused) fine-tuning run keeps the class order it was trained in and never loads the ``init`` file
        again; where that file still exists, its SHA-256 must be the one the run started from (clear
        :class:`IgradError` otherwise: the run would claim a start it did not have)."""
        c = self.config
        self.data = prepare_data(c)
        self.init_sha256: str | None = None
        if c.init is None:
            return None
        if state is None:
            init = load_init(c, self.data)
            self.data, self.init_sha256 = init.data, init.sha256
            return init
        saved = state["config"]
        self.init_sha256 = saved.get("init_sha256")
        _check_same_init(c.init, self.init_sha256, self.run_dir)
        if saved.get("classes") is not None and "num_classes" in saved:
            self.data = match_data_classes(
                self.data, saved["classes"], int(saved["num_classes"]), source=c.data, model="the run being resumed"
            )
        return None

    def _preflight(self) -> None:
        """One eval-mode forward and gradient pair on two training images: shape, class-count and
        non-linearity problems surface here, before the run folder is created."""
        d, c = self.data, self.config
        x, y = eval_tensors(d.train, d.normalization, torch.arange(min(2, len(d.train))), self.device)
        with eval_mode(self.model):
            try:
                with torch.no_grad():
                    logits = model_logits(self.model, x)
            except RuntimeError as exc:
                raise IgradError(
                    f"model {c.model!r} cannot process the images of {c.data} "
                    f"(shape {tuple(x.shape[1:])}): {str(exc).splitlines()[0]}"
                ) from exc
            if logits.shape[1] != self.num_classes:
                raise IgradError(
                    f"model {c.model!r} returned logits of shape {tuple(logits.shape)} for {self.num_classes} classes"
                )
            if c.lam > 0 or c.cos_samples > 0:
                gradient_cosine(self.model, x, y, allow=c.allow)

    def _config_dict(self) -> dict[str, Any]:
        c, d = self.config, self.data
        return {
            **c.to_dict(),
            "out": str(self.run_dir),
            "model_kwargs": c.model_kwargs,
            "num_classes": self.num_classes,
            "classes": list(d.classes),
            "image_shape": list(d.train.images.shape[1:]),  # [C, H, W]
            **d.normalization.to_config(),
            "data": str(Path(c.data).resolve()) if Path(c.data).is_dir() else c.data,
            "world_size": self.dist.world,
            "steps_per_epoch_effective": self.steps_per_epoch,
            "train_images": len(d.train),
            "val_images": len(d.val) if d.val is not None else 0,
            **({"init_sha256": self.init_sha256} if c.init is not None else {}),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        names = saved.get("classes")
        if names is not None and list(names) != list(self.data.classes):
            added = sorted(set(self.data.classes) - set(names))
            gone = sorted(set(names) - set(self.data.classes))
            raise IgradError(
                f"cannot resume the run in {self.run_dir}: the classes of {self.config.data} changed since the run "
                f"was trained (new: {added or 'none'}; missing: {gone or 'none'}); restore the class folders or "
                "start a new run"
            )
        # a field the checkpoint predates was trained with that field's default (e.g. no label smoothing)
        defaults = TrainConfig().to_dict()
        mismatch = [
            k
            for k, v in self.config.to_dict().items()
            if k not in RESUME_OVERRIDES and k not in ("mean", "std") and saved.get(k, defaults[k]) != v
        ]
        if mismatch:
            k = mismatch[0]
            raise IgradError(
                f"cannot resume the run in {self.run_dir}: {k} is {self.config.to_dict()[k]!r} but the run was "
                f"trained with {saved.get(k, defaults[k])!r} (only {', '.join(sorted(RESUME_OVERRIDES))} may "
                f"change when resuming); to train these settings, use another folder or delete {self.run_dir}"
            )
        if saved.get("world_size", 1) != self.dist.world:
            print(
                f"note: resuming a run of {saved.get('world_size', 1)} process(es) with {self.dist.world}",
                file=sys.stderr,
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise IgradError(f"checkpoint does not match this run's model/optimiser: {exc}") from exc
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.global_step = int(state["step"])
        self.sums = torch.tensor(state.get("epoch_sums", [0.0] * 5), dtype=torch.float64)
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.elapsed = float(state.get("elapsed", 0.0))
        self.saved = f"the checkpoint it resumed from ({self.run_dir / 'last.pt'}) is kept"
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def sessions(self) -> list[dict[str, Any]]:
        """The processes that trained this run: those of the checkpoint it resumed from, then this one once it
        has trained a step (or started the run): a finished run reused by a later process adds none."""
        trained = self.global_step > self.session["from_step"] or not self.earlier_sessions
        return [*self.earlier_sessions, *([dict(self.session)] if trained else [])]

    def _provenance(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """:func:`igrad.provenance.provenance` with the commit of the session that trained the weights last: a
        finished run reused by a later process keeps naming the code that trained it."""
        prov = provenance(cfg, self.config.seed)
        prov["commit"] = self.sessions()[-1]["commit"]
        return prov

    def _elapsed(self) -> float:
        return self.elapsed + time.perf_counter() - self._since

    # -- files (rank 0) ---------------------------------------------------------------------------------
    @property
    def writes(self) -> bool:
        return self.dist.rank == 0

    def _checkpoint_state(self) -> dict[str, Any]:
        cfg = self._config_dict()
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.global_step,
            "epoch_sums": self.sums.tolist(),
            "rng": rng,
            "config": cfg,
            "history": self.history,
            "best": self.best,
            "elapsed": self._elapsed(),
            "sessions": self.sessions(),
            "provenance": self._provenance(cfg),
        }

    def _write_logs(self, status: str) -> None:
        lines = "".join(json.dumps(_finite(h), allow_nan=False) + "\n" for h in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        cfg = self._config_dict()
        summary = {
            "status": status,
            "recipe": self.config.preset,
            "epochs_done": self.epoch,
            "final": _finite(self.history[-1]) if self.history else None,
            "best": _finite(self.best),
            "sessions": self.sessions(),
            "provenance": self._provenance(cfg),
        }
        atomic_write_json(self.run_dir / "run.json", summary)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        c = self.config
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            header = f"igrad train: effective config (recipe {c.preset!r}); rerun with: igrad train --config FILE"
            atomic_write_text(self.run_dir / "config.toml", config_to_toml(self._config_toml_values(), header))
            self._write_logs("running")
        while self.epoch < c.epochs:
            self._train_epoch()
        if self.writes:
            self._write_logs("finished")
        self.model.eval()
        return RunResult(
            self.run_dir, self._config_dict(), list(self.history), self.model, dict(self.best), self.sessions()
        )

    def _config_toml_values(self) -> dict[str, Any]:
        values = self.config.to_dict()
        values["out"] = str(self.run_dir)
        values.update(self.data.normalization.to_config())
        return values

    def _train_epoch(self) -> None:
        c = self.config
        epoch = self.epoch  # 0-based; the log calls it epoch + 1
        start = time.perf_counter()
        self._train_steps(epoch)
        train_time = time.perf_counter() - start
        record = self._epoch_record(self._evaluate(), start, train_time)
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = torch.zeros(5, dtype=torch.float64)
        key = "val_acc" if self.data.val is not None else "test_acc"
        improved = not self.best or record[key] > self.best["value"]
        if improved:
            self.best = {"epoch": epoch + 1, "metric": key, "value": record[key]}
        self._save(best=improved)
        if self.writes:
            self._write_logs("running")
            print(_summary_line(record, c.epochs), flush=True)

    def _train_steps(self, epoch: int) -> None:
        """The remaining optimiser steps of ``epoch``, with a progress bar, mid-epoch checkpoints and callbacks."""
        c = self.config
        order = self._epoch_order(epoch)
        self.model.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{c.epochs}",
            disable=self.quiet or not self.writes or not sys.stderr.isatty(),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                self._train_step(order, epoch, self.step_in_epoch)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if self.step_in_epoch % 10 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    s = self.sums
                    bar.set_postfix(loss=f"{s[0] / s[4]:.3f}", acc=f"{100 * s[3] / s[4]:.1f}%")
                if (
                    c.checkpoint_every
                    and self.global_step % c.checkpoint_every == 0
                    and self.step_in_epoch < self.steps_per_epoch
                ):
                    self._save(best=False)
                self._step_done()
        finally:
            bar.close()

    def _epoch_record(self, evaluation: dict[str, Any], start: float, train_time: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` line of the epoch that just ended (keys :data:`METRIC_KEYS`)."""
        s = self.sums
        return {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": self.last_lr,
            "lam": self.last_lam,
            "loss": float(s[0] / s[4]),
            "l_c": float(s[1] / s[4]),
            "l_r": float(s[2] / s[4]) if self.config.lam > 0 else None,
            "train_acc": float(s[3] / s[4]),
            "samples": int(s[4]),
            **evaluation,
            "time": round(time.perf_counter() - start, 3),
            "train_time": round(train_time, 3),
            "elapsed": round(self._elapsed(), 3),
        }

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``: augmented, normalised images and labels."""
        c, d, dist = self.config, self.data, self.dist
        batch = order[step * c.batch_size : (step + 1) * c.batch_size]
        gen = torch.Generator().manual_seed(_derive_seed(c.seed, epoch, step, _AUG))
        # augmentation parameters are drawn for the global batch, so they do not depend on the world size
        images = self.images[batch.to(self.images.device)]
        x = augment(images, padding=c.crop_padding, flip=c.flip, rotation=c.rotation, generator=gen)
        x = d.normalization.apply(x[dist.rank :: dist.world].to(self.device, non_blocking=True))
        y = d.train.labels[batch][dist.rank :: dist.world].to(self.device, non_blocking=True)
        return (to_channels_last(x) if c.channels_last else x), y

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(_derive_seed(self.config.seed, epoch, _ORDER))
        return torch.randperm(len(self.data.train), generator=g)

    def _train_step(self, order: torch.Tensor, epoch: int, step: int) -> None:
        c, dist = self.config, self.dist
        x, y = self._batch(order, epoch, step)
        torch.manual_seed(_derive_seed(c.seed, epoch, step, dist.rank, _DROPOUT))
        self.last_lam = lam = c.lam * lam_factor(self.global_step, c, self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, c.amp):
            if self.criterion is not None:
                # the regulariser's subset (reg_fraction < 1) is seeded per step and rank: exact on resume
                subset = torch.Generator().manual_seed(_derive_seed(c.seed, epoch, step, dist.rank, _SUBSET))
                l_r, logits = self.criterion(self.ddp, x, y, generator=subset)
            else:
                if c.amp and self.device.type == "cpu":  # the engine's fast bf16 strided depthwise backward
                    logits, _ = training_forward(self.ddp, x, allow=c.allow)
                else:
                    logits = model_logits(self.ddp, x, probabilities=False)  # checked in _preflight
                l_r = torch.zeros((), device=self.device)  # not computed at λ = 0
            l_c = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
            loss = l_c + lam * l_r.float()
        n = float(len(y))
        step_sums = torch.stack(
            [
                loss.detach() * n,
                l_c.detach() * n,
                l_r.detach().float() * n,
                (logits.argmax(1) == y).sum().float(),
                torch.tensor(n, device=self.device),
            ]
        ).double()
        step_sums = dist.all_reduce(step_sums).cpu()
        if not bool(torch.isfinite(step_sums[:3]).all()):
            self._non_finite(epoch, step, step_sums)
        loss.backward()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.sums += step_sums

    def _step_done(self) -> None:
        """Tell the callbacks that an optimiser step is done."""
        if not self.callbacks:
            return
        info = StepInfo(
            self.epoch, self.step_in_epoch, self.steps_per_epoch, self.global_step, self.last_lr, self.run_dir
        )
        for callback in self.callbacks:
            callback(info)

    def _save(self, best: bool) -> None:
        """Write last.pt (and best.pt) from rank 0, after checking that every weight is finite (all ranks)."""
        bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            self._stop(f"non-finite weights ({bad[0]}) after global step {self.global_step}")
        if self.writes:
            state = self._checkpoint_state()
            save_checkpoint(self.run_dir / "last.pt", state)
            if best:
                save_checkpoint(self.run_dir / "best.pt", state)
        where = f"step {self.step_in_epoch} of epoch {self.epoch + 1}" if self.step_in_epoch else f"epoch {self.epoch}"
        self.saved = f"the last good checkpoint {self.run_dir / 'last.pt'} (end of {where}) is kept"

    def _non_finite(self, epoch: int, step: int, s: torch.Tensor) -> None:
        c = self.config
        self._stop(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} of {self.steps_per_epoch} "
            f"(global step {self.global_step + 1}): L = {float(s[0] / s[4]):g}, L_C = {float(s[1] / s[4]):g}"
            + (f", L_R = {float(s[2] / s[4]):g}" if c.lam > 0 else "")
        )

    def _stop(self, what: str) -> None:
        message = f"{what}; training stopped, {self.saved}. Try a lower --lr or --lam."
        if self.writes:
            self._write_logs(f"stopped: {message}")
        raise NonFiniteLossError(message)

    def _evaluate(self) -> dict[str, Any]:
        c, d, dist = self.config, self.data, self.dist
        dist.broadcast_buffers(self.model)  # one set of BatchNorm statistics for every rank
        model = self.model
        out: dict[str, Any] = {}
        with eval_mode(model):
            for name, split, cos_index in (("test", d.test, self.cos_index), ("val", d.val, self.val_cos_index)):
                if split is None:
                    continue
                shard = dist.shard(len(split))
                correct = correct_count(
                    model, split, shard, d.normalization, batch_size=c.eval_batch_size, device=self.device, amp=c.amp
                )
                sums = [float(correct), 0.0]
                if c.cos_samples > 0 and cos_index is not None:
                    idx = cos_index[dist.rank :: dist.world]
                    if len(idx):
                        x, y = eval_tensors(split, d.normalization, idx, self.device)
                        sums[1] = gradient_cosine_sum(model, x, y, batch_size=c.eval_batch_size, allow=c.allow)
                t = dist.all_reduce(torch.tensor(sums, dtype=torch.float64, device=self.device)).cpu()
                out[f"{name}_acc"] = float(t[0]) / len(split)
                out[f"{name}_cos" if name == "val" else "cos"] = (
                    float(t[1]) / len(cos_index) if c.cos_samples > 0 and cos_index is not None else None
                )
        return out


def _earlier_sessions(state: Mapping[str, Any] | None, session: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sessions recorded in a checkpoint being resumed; for a checkpoint written before sessions were
    recorded, one entry with ``session``'s fields, ``None`` but for the commit its provenance names (read
    when it was written, so possibly later than the code that trained it)."""
    if state is None:
        return []
    if "sessions" in state:
        return [dict(s) for s in state["sessions"]]
    commit = state.get("provenance", {}).get("commit")
    recorded = {"recorded": "when the checkpoint was written", "until_step": int(state["step"])}
    return [{**dict.fromkeys(session), "commit": commit, **recorded}]


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats as strings (JSON results files hold finite numbers only)."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _summary_line(r: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {r['loss']:.4f}"]
    if r.get("l_r") is not None:
        parts[-1] += f" (L_C {r['l_c']:.4f}, L_R {r['l_r']:.4f})"
    parts.append(f"acc {100 * r['train_acc']:.2f}%")
    if "val_acc" in r:
        parts.append(f"val {100 * r['val_acc']:.2f}%")
    parts.append(f"test {100 * r['test_acc']:.2f}%")
    if r.get("cos") is not None:
        parts.append(f"cos {r['cos']:.3f}")
    parts += [f"lr {r['lr']:.4g}", f"{r['time']:.1f}s"]
    return "  ".join(parts)


def fit(
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    callbacks: Sequence[StepCallback] = (),
) -> RunResult:
    """Train ``config`` (default: ``TrainConfig()``, the paper recipe); return a :class:`RunResult`.

    ``resume``: a run folder (its ``last.pt``) or a checkpoint file; the run continues where that
    checkpoint left off, in the checkpoint's folder. ``config`` may then be ``None`` (the saved
    config) or equal the saved one except :data:`RESUME_OVERRIDES`.

    ``quiet``: no progress bar (there is none either when stderr is not a terminal); the one-line
    epoch summaries are printed by rank 0 in any case.

    ``callbacks``: functions called with a :class:`StepInfo` after every optimiser step (e.g. to log, or
    to stop the process at a known point); an exception from one ends the run like any error.

    Raises :class:`IgradError` for bad input and
    :class:`NonFiniteLossError` when the loss stops being finite. The process's torch RNG state and
    thread count are restored on return.
    """
    state, run_dir = None, None
    if resume is not None:
        path = Path(resume)
        ckpt = path / "last.pt" if path.is_dir() else path
        state = load_checkpoint(ckpt)
        run_dir = ckpt.parent
        if config is None:
            config = saved_config(state)
    config = config if config is not None else TrainConfig()
    config.validate()
    threads = torch.get_num_threads()
    dist = Dist.from_env(config.device)
    finished = False
    trainer: _Trainer | None = None
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        trainer = _Trainer(config, dist, quiet, callbacks)
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trainer.setup(state, run_dir)
            del state
            result = trainer.run()
        finished = True
        return result
    finally:
        torch.set_num_threads(threads)
        if trainer is not None:
            trainer.release_ddp()
        dist.close(finished=finished)


def fit_or_resume(config: TrainConfig, *, quiet: bool = False) -> RunResult:
    """:func:`fit` ``config`` in its run folder ``config.out``: a finished run is reused (nothing trained),
    an interrupted one resumed from its ``last.pt``, a folder trained with another config refused
    (:class:`IgradError`)."""
    last = Path(config.out) / "last.pt"
    return fit(config, resume=last if last.is_file() else None, quiet=quiet)
