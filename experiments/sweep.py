"""Short training sweeps over the regulariser's settings, on real CIFAR-100 (the choices of docs/method.md §The loss).

Every run trains the CIFAR ResNet-18 from the same seed with the reduced-budget recipe cut to
``--epochs × --steps-per-epoch`` steps; the baseline (λ = 0) runs once. Reports test and validation
accuracy and eval-mode mean cos(δx, δᴳx), and writes a JSON file with provenance.

* statistics mode (which default?): ``--lams 0,0.75 --stats running,batch-frozen``
* λ (which default?): ``--lams 0,0.0075,0.075,0.75 --stats batch-frozen --val-fraction 0.1``
  (choose on the validation columns, never on the test subset)

    IGRAD_DATA=/path/to/cifar100 python experiments/sweep.py --lams 0,0.75 --stats running,batch-frozen \\
        --results results/stats_mode.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from igrad.atomic import atomic_write_json
from igrad.data import data_root_from_env
from igrad.provenance import provenance
from igrad.train import TrainConfig, fit_or_resume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder (default: $IGRAD_DATA)")
    ap.add_argument("--lams", default="0,0.75", help="comma-separated λ values (0: the baseline)")
    ap.add_argument("--stats", default="batch-frozen", help="comma-separated statistics modes")
    ap.add_argument("--errors", default="cosine", help="comma-separated error functions")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--val-fraction", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--results", default="results/sweep.json")
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
        val_fraction=args.val_fraction,
        threads=args.threads,
        seed=0,
    )
    runs: dict[str, dict] = {}
    for lam in (float(v) for v in args.lams.split(",")):
        if lam == 0:
            runs["baseline"] = dict(lam=0.0)
            continue
        for stats in args.stats.split(","):
            for error in args.errors.split(","):
                runs[f"lam={lam:g},stats={stats},error={error}"] = dict(lam=lam, stats=stats, error=error)
    rows = {}
    for name, extra in runs.items():
        out = Path(args.out) / name.replace(",", "_").replace("=", "")
        config = TrainConfig.preset_config("cpu", **common, **extra, out=str(out))
        t0 = time.time()
        result = fit_or_resume(config, quiet=True)
        final = result.final
        rows[name] = {
            "test_acc": result.test_acc,
            "cos": result.cos,
            "val_acc": final.get("val_acc"),
            "val_cos": final.get("val_cos"),
            "wall_s": round(time.time() - t0, 1),
            "run_dir": str(result.run_dir),
            "config": config.to_dict(),
        }
        print(
            f"{name:42s} val acc {final.get('val_acc') or float('nan'):7.2%}  val cos "
            f"{final.get('val_cos') or float('nan'):6.3f}  test acc {result.test_acc:7.2%}  test cos {result.cos:6.3f}",
            flush=True,
        )
    atomic_write_json(args.results, {"runs": rows, **provenance(vars(args), seed=0)})


if __name__ == "__main__":
    main()
