"""Does a trained model's eval mode match its training mode? BatchNorm running statistics against batch
statistics, on the run's own validation split.

For each run folder (its ``config.toml`` and ``last.pt``): top-1 on ``--n`` seeded validation images (a) in
eval mode (running statistics, as every reported accuracy), (b) in training mode (each batch of
``--batch`` normalised with its own statistics), (c) in eval mode after re-estimating the running statistics
(reset, cumulative average, ``momentum=None``) from training-mode forwards of *other* validation images; and
per BatchNorm layer, on one batch in training mode, the largest over channels of
``|running_mean − batch_mean| / batch_sd`` and ``|log(running_var / batch_var)|``. A model whose (a) is far
below (b) and (c) has running statistics that no longer describe its activations.

    IGRAD_DATA=/path/to/cifar100 python experiments/bn_drift.py runs/tradeoff/score-logit-lam0.075 \\
        runs/tradeoff/score-prob-lam0.075 --results results/tradeoff/bn_drift.json
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from igrad.atomic import atomic_write_json
from igrad.checkpoint import load_model
from igrad.measure import correct_count
from igrad.provenance import provenance
from igrad.train import TrainConfig, prepare_data


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _layer_drift(model: nn.Module, x: torch.Tensor) -> list[dict[str, float]]:
    """Per BatchNorm layer: the running statistics against one training-mode batch's (buffers restored)."""
    bns = _batchnorms(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    saved = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for b in bns]
    hooks = [
        b.register_forward_hook(lambda m, i, o: seen.append((i[0].mean((0, 2, 3)), i[0].var((0, 2, 3))))) for b in bns
    ]
    try:
        model.train()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for b, (mean, var, n) in zip(bns, saved, strict=True):
            b.running_mean.copy_(mean), b.running_var.copy_(var), b.num_batches_tracked.copy_(n)
        model.eval()
    rows = []
    for b, (mean, var) in zip(bns, seen, strict=True):
        rows.append(
            {
                "mean_shift_sd": float(((b.running_mean - mean).abs() / var.sqrt().clamp_min(1e-12)).max()),
                "log_var_ratio": float((b.running_var / var.clamp_min(1e-12)).log().abs().max()),
            }
        )
    return rows


@torch.no_grad()
def _reestimate(model: nn.Module, fit: torch.Tensor, batch: int) -> None:
    """Replace the running statistics by their cumulative average over training-mode forwards of ``fit``."""
    for b in _batchnorms(model):
        b.reset_running_stats()
        b.momentum = None
    model.train()
    for i in range(0, len(fit), batch):
        model(fit[i : i + batch])


def diagnose(run: Path, n: int, batch: int, seed: int) -> dict[str, Any]:
    """The three accuracies and the per-layer drift of one run folder."""
    config = TrainConfig.from_dict(tomllib.loads((run / "config.toml").read_text(encoding="utf-8")))
    data = prepare_data(config)
    if data.val is None:
        raise SystemExit(f"{run}: the run has no validation split")
    model, _ = load_model(run / "last.pt")
    order = torch.randperm(len(data.val.labels), generator=torch.Generator().manual_seed(seed))
    index = order[:n]

    def top1() -> float:  # in the model's current mode
        cpu = torch.device("cpu")
        return correct_count(model, data.val, index, data.normalization, batch_size=batch, device=cpu) / len(index)

    def images(part: torch.Tensor) -> torch.Tensor:
        return data.normalization.apply(data.val.images[part])

    model.eval()
    eval_top1, layers = top1(), _layer_drift(model, images(index[:batch]))
    model.train()
    train_top1 = top1()  # (updates the running statistics: replaced next)
    _reestimate(model, images(order[n : 2 * n]), batch)
    model.eval()
    return {
        "run": str(run),
        "eval_top1": eval_top1,
        "train_mode_top1": train_top1,
        "reestimated_eval_top1": top1(),
        "layers": layers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (config.toml, last.pt)")
    ap.add_argument("--n", type=int, default=1000, help="validation images evaluated (and as many to re-estimate)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=None, help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [diagnose(run, args.n, args.batch, args.seed) for run in args.runs]
    for r in rows:
        worst = max(r["layers"], key=lambda d: d["mean_shift_sd"])
        print(
            f"{r['run']}: top-1 eval {r['eval_top1']:.1%}, train mode {r['train_mode_top1']:.1%}, eval after "
            f"re-estimation {r['reestimated_eval_top1']:.1%}; worst layer |Δmean|/sd {worst['mean_shift_sd']:.2f}"
        )
    if args.results:
        settings = {"n": args.n, "batch": args.batch, "seed": args.seed}
        atomic_write_json(args.results, {"runs": rows, "settings": settings, "provenance": provenance(None, args.seed)})


if __name__ == "__main__":
    main()
