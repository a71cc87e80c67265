"""Which BatchNorm statistics mode should the regulariser default to? (SPEC 1)

Trains the CIFAR ResNet-18 on real CIFAR-100 three times from the same seed: the baseline (λ = 0)
and the regularised model with ``stats=running`` and ``stats=batch-frozen``, then reports test
accuracy and the eval-mode mean cos(δx, δᴳx) on a fixed test subset, and writes
``results/stats_mode.json`` (with provenance). The default is the mode with the higher eval-mode test
cos at equal accuracy.

    IGRAD_DATA=/path/to/cifar100 python experiments/stats_mode.py --epochs 3 --steps-per-epoch 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from igrad.data import data_root_from_env
from igrad.provenance import atomic_write_json, provenance
from igrad.train import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder (default: $IGRAD_DATA)")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--lam", type=float, default=0.75)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="runs/stats_mode")
    ap.add_argument("--results", default="results/stats_mode.json")
    args = ap.parse_args()
    data = args.data or data_root_from_env()
    if data is None:
        raise SystemExit("set IGRAD_DATA or --data to the CIFAR-100 image folder")
    common = dict(
        model="cifar_resnet18",
        width=args.width,
        data=str(data),
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        threads=args.threads,
        seed=0,
    )
    runs = {"baseline": dict(lam=0.0), "running": dict(lam=args.lam, stats="running")}
    runs["batch-frozen"] = dict(lam=args.lam, stats="batch-frozen")
    rows = {}
    for name, extra in runs.items():
        config = TrainConfig.preset_config("cpu", **common, **extra, out=str(Path(args.out) / name))
        t0 = time.time()
        result = fit(config, quiet=True)
        rows[name] = {**result.summary(), "wall_s": round(time.time() - t0, 1), "config": config.to_dict()}
        print(f"{name:14s} test acc {result.test_acc:6.2%}  eval-mode test cos {result.cos:.3f}", flush=True)
    atomic_write_json(args.results, {"runs": rows, **provenance(vars(args), seed=0)})
    print(json.dumps({k: {"acc": v.get("test_acc"), "cos": v.get("cos")} for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
