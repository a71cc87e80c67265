"""Time per epoch of a training preset (``cpu`` by default, ``paper`` with ``--preset paper``), and the
data-loading share of it.

For CIFAR ResNet-18 and MobileNet-V2 at the preset's width, with λ = 0 and λ > 0, on the real
CIFAR-100 (``IGRAD_DATA``; else random uint8 images of the same shape, said so in the output), in one
process: ``--steps`` training steps of ``igrad.train``'s own step code after ``--warmup`` untimed
ones, extrapolated to a full epoch (``ceil(50000/128) = 391`` steps), plus one end-of-epoch evaluation
(test accuracy on all test images and the mean cos on the fixed subset), timed as it runs in
``fit``. The loader (index the in-memory uint8 images, augment per sample, normalise) is timed alone
over the *same* batches, and its share of the full step printed: the loader is not the bottleneck
when that share is small.

    IGRAD_DATA=/path/to/cifar100 python benchmarks/epoch_time.py --steps 10 --threads 1
    python benchmarks/epoch_time.py --preset paper --device cuda --models cifar_resnet18   # epochs/s on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import sync
from igrad.data import Split, data_root_from_env
from igrad.normalization import NORMALIZATIONS
from igrad.train import TrainConfig, TrainData
from igrad.train.distributed import Dist
from igrad.train.trainer import _Trainer


def synthetic() -> TrainData:
    g = torch.Generator().manual_seed(0)
    classes = [f"c{i}" for i in range(100)]

    def split(n: int) -> Split:
        return Split(
            torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 100, (n,), generator=g),
            classes,
        )

    return TrainData(split(50000), split(10000), None, NORMALIZATIONS["cifar100"])


def make_trainer(config: TrainConfig, data: TrainData | None) -> _Trainer:
    import igrad.train.trainer as train

    trainer = _Trainer(config, Dist(), quiet=True)
    if data is not None:  # no real data: stand in the synthetic splits
        original = train.prepare_data
        train.prepare_data = lambda c: data
        try:
            trainer.setup(None, None)
        finally:
            train.prepare_data = original
    else:
        trainer.setup(None, None)
    return trainer


def time_config(config: TrainConfig, data: TrainData | None, steps: int, warmup: int) -> dict[str, float]:
    trainer = make_trainer(config, data)
    order = trainer._epoch_order(0)
    trainer.model.train()
    for s in range(warmup):
        trainer._train_step(order, 0, s)
    step_times, load_times = [], []
    for s in range(warmup, warmup + steps):
        sync()
        t = time.perf_counter()
        trainer._batch(order, 0, s)
        sync()
        load_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer._train_step(order, 0, s)  # includes the same loading work
        sync()
        step_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    trainer._evaluate()
    sync()
    eval_time = time.perf_counter() - t
    step = statistics.median(step_times)
    load = statistics.median(load_times)
    per_epoch = trainer.steps_per_epoch
    return {
        "step": step,
        "load": load,
        "eval": eval_time,
        "steps_per_epoch": per_epoch,
        "epoch": step * per_epoch + eval_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--lam", type=float, default=None, help="λ of the regularised runs (default: igrad's)")
    parser.add_argument("--models", default="cifar_resnet18,cifar_mobilenet_v2")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="training preset (default cpu)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    args = parser.parse_args()
    root = data_root_from_env()
    data = None if root is not None else synthetic()
    where = f"real CIFAR-100 at {root}" if root is not None else "random images (IGRAD_DATA not set)"
    base = TrainConfig.preset_config(
        args.preset, data=str(root) if root else "synthetic", threads=args.threads, device=args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    lam = args.lam if args.lam is not None else base.lam
    print(
        f"preset {args.preset}: width {base.width}, batch {base.batch_size}, {base.epochs} epochs, device "
        f"{args.device}; data: {where}; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps, extrapolated to one epoch (median step)")
    header = f"{'model':<20}{'lam':>8}{'step s':>9}{'loader s':>10}{'loader %':>10}{'eval s':>8}{'epoch min':>11}"
    print(header)
    results = {}
    for model in args.models.split(","):
        for lam_value in (0.0, lam):
            config = base.replace(model=model, lam=lam_value)
            r = time_config(config, data, args.steps, args.warmup)
            results[model, lam_value] = r
            print(
                f"{model:<20}{lam_value:>8g}{r['step']:>9.3f}{r['load']:>10.4f}{100 * r['load'] / r['step']:>9.1f}%"
                f"{r['eval']:>8.1f}{r['epoch'] / 60:>11.1f}   ({1 / r['epoch']:.4f} epochs/s)",
                flush=True,
            )
    print("ratios:")
    for model in args.models.split(","):
        a, b = results[model, 0.0], results[model, lam]
        print(
            f"  {model}: epoch(λ={lam:g}) / epoch(λ=0) = {b['epoch'] / a['epoch']:.2f}; "
            f"loader / step = {a['load'] / a['step']:.3f} (λ=0), {b['load'] / b['step']:.3f} (λ>0)"
        )
    total = sum(r["epoch"] for r in results.values()) * base.epochs / 3600
    runs = f"the {len(results)} {args.preset}-preset runs of {base.epochs} epochs"
    print(f"  {runs}: about {total:.1f} h on this machine")


if __name__ == "__main__":
    main()
