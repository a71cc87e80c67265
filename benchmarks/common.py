"""Pieces the benchmark scripts share: the images they time on, and device synchronisation."""

from __future__ import annotations

import torch

from igrad.data import data_root_from_env, eval_tensors, load_split
from igrad.normalization import NORMALIZATIONS


def load_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised test images, their labels and a description: a seeded subset of the test split
    of ``$IGRAD_DATA`` when set (a trained model's activations on noise are atypical), else random
    tensors (and random labels) from the same seed."""
    root = data_root_from_env()
    if root is not None:
        split = load_split(root, "test")
        idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = eval_tensors(split, NORMALIZATIONS["cifar100"], idx)
        return x, y, f"real CIFAR-100 test images from {root}"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    return x, torch.randint(0, 100, (n,), generator=gen), "random tensors (set IGRAD_DATA for real images)"


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it (nothing to do on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
