"""Evaluation in bf16 against float32: every saliency method and metric of ``igrad
evaluate`` on the same real test images, once with ``amp=False`` and once with ``amp=True``, interleaved in
blocks (the order alternating) so that a change of machine load hits both alike.

Reports, per method, the largest and the mean absolute difference of the normalised maps (in [0, 1]) and how
many images have a pixel that moved by more than 0.1, and per
metric the mean over images in each precision, their difference and the largest per-image difference; the
wall time of each method's maps and metrics in each precision and their ratio. Writes a JSON with provenance.

    IGRAD_DATA=/path/to/cifar100 python experiments/eval_amp.py --checkpoint RUN/last.pt --n 200 \\
        --results results/eval_bf16.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

import igrad.evaluate as ev
from igrad.atomic import atomic_write_json
from igrad.checkpoint import load_model
from igrad.data import Split, data_root_from_env, load_split, match_classes
from igrad.normalization import Normalization
from igrad.provenance import provenance


def _recording(store: dict[str, list[torch.Tensor]]) -> tuple[Any, Any]:
    """``igrad.evaluate._saliency`` that also keeps each method's maps (in call order)."""
    original = ev._saliency

    def record(model: torch.nn.Module, name: str, kw: Any, clean: Any, seed: int) -> torch.Tensor:
        maps = original(model, name, kw, clean, seed)
        store.setdefault(name, []).append(maps.float().cpu())
        return maps

    return original, record


def _run(model: torch.nn.Module, block: Split, norm: Normalization, amp: bool, seed: int, batch_size: int):
    store: dict[str, list[torch.Tensor]] = {}
    original, record = _recording(store)
    ev._saliency = record
    try:
        res = ev.evaluate_model(
            model, block, normalization=norm, accuracy=False, amp=amp, seed=seed, batch_size=batch_size, progress=False
        )
    finally:
        ev._saliency = original
    return res, {m: torch.cat(v) for m, v in store.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=None, help="image folder (default: $IGRAD_DATA)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="results/eval_bf16.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or data_root_from_env()
    if data is None:
        sys.exit("needs real data: --data or IGRAD_DATA")
    load_start = os.getloadavg()
    model, config = load_model(args.checkpoint, map_location="cpu")
    norm = Normalization.from_config(config, args.checkpoint)
    split = match_classes(load_split(data, "test"), config.get("classes"), int(config["num_classes"]))
    indices = ev.select_indices(len(split), args.n, args.seed)
    per_block = -(-args.n // args.blocks)
    runs: dict[bool, list] = {False: [], True: []}
    for b, lo in enumerate(range(0, args.n, per_block)):
        idx = indices[lo : lo + per_block]
        block = Split(split.images[idx], split.labels[idx], split.classes)
        for amp in (False, True) if b % 2 == 0 else (True, False):
            runs[amp].append(_run(model, block, norm, amp, args.seed + b, args.batch_size))
        print(f"block {b}: images {lo}..{lo + len(idx) - 1} done, load {os.getloadavg()[0]:.1f}", flush=True)
    summary = _summarise(runs)
    for m, d in summary["methods"].items():
        metrics = ", ".join(f"{k} {v['mean_difference']:+.3f}" for k, v in d["metrics"].items())
        t = d["seconds"]
        print(
            f"{m:15s} max|dS| {d['map_max_abs_difference']:.3f} mean {d['map_mean_abs_difference']:.4f} "
            f"(images > 0.1: {d['images_with_max_difference_over_0.1']}); {metrics}; "
            f"time fp32 {t['float32']:.1f} s bf16 {t['bf16']:.1f} s ({t['float32'] / t['bf16']:.2f}x)"
        )
    tot = summary["total_seconds"]
    print(f"total fp32 {tot['float32']:.0f} s, bf16 {tot['bf16']:.0f} s: {tot['float32'] / tot['bf16']:.2f}x")
    sha = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    out = {
        "kind": "igrad.eval_bf16",
        "command": "python " + " ".join(sys.argv),
        "checkpoint": {
            "path": str(args.checkpoint),
            "sha256": sha,
            "model": config.get("model"),
            "model_kwargs": config.get("model_kwargs"),
        },  # fmt: skip
        "data": {"source": str(data), "split": "test", "n": args.n, "indices": indices.tolist(), "blocks": args.blocks},
        "threads": args.threads,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        **summary,
        "provenance": provenance(config, args.seed),
    }
    atomic_write_json(Path(args.results), out)
    print(f"wrote {args.results}")


def _summarise(runs: dict[bool, list]) -> dict:
    """Map and metric differences bf16 − float32 and the wall times, over all blocks."""
    methods = list(runs[False][0][0]["results"])
    out: dict = {"methods": {}, "total_seconds": {}}
    for amp, key in ((False, "float32"), (True, "bf16")):
        out["total_seconds"][key] = sum(r["timing"]["total_s"] for r, _ in runs[amp])
    for m in methods:
        maps = {amp: torch.cat([mp[m] for _, mp in runs[amp]]) for amp in runs}
        diff = (maps[True] - maps[False]).abs()
        per_image = diff.flatten(1).amax(1)
        d = {
            "map_max_abs_difference": float(diff.max()),
            "map_mean_abs_difference": float(diff.mean()),
            "map_median_of_per_image_max": float(per_image.median()),
            "images_with_max_difference_over_0.1": int((per_image > 0.1).sum()),
            "metrics": {},
        }
        for k in runs[False][0][0]["per_sample"]["methods"][m]:
            v = {amp: torch.tensor(sum((r["per_sample"]["methods"][m][k] for r, _ in runs[amp]), []),
                                   dtype=torch.float64) for amp in runs}  # fmt: skip
            d["metrics"][k] = {
                "float32_mean": float(v[False].mean()),
                "bf16_mean": float(v[True].mean()),
                "mean_difference": float((v[True] - v[False]).mean()),
                "max_abs_difference": float((v[True] - v[False]).abs().max()),
            }
        secs = {
            key: sum(sum(r["timing"]["method_s"][m].values()) for r, _ in runs[amp])
            for amp, key in ((False, "float32"), (True, "bf16"))
        }
        d["seconds"] = secs
        out["methods"][m] = d
    return out


if __name__ == "__main__":
    main()
