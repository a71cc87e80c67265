"""Data sets: CIFAR-10/100 through torchvision, or any image folder, as in-memory uint8 tensors.

Small-image data sets fit in memory, and decoding PNGs is the slow part of loading them on a CPU
machine, so a split is decoded once into ``images`` ``uint8 [N, C, H, W]`` and ``labels``
``int64 [N]`` (cached on disk under ``$IGRAD_CACHE``, default ``~/.cache/igrad``, keyed by the folder's
path, file list and modification times). Image folders follow torchvision's ``ImageFolder`` rules,
so the class index is the position of the class name in sorted order; for the CIFAR-100 copy this
equals the official fine label (its README).

``IGRAD_DATA`` names the real data (an image-folder root with ``train/`` and ``test/``) for tests,
benchmarks and the demo.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import IgradError

__all__ = [
    "Split",
    "load_split",
    "data_root_from_env",
    "NORMALIZATION",
    "normalization_for",
    "normalize",
    "eval_tensors",
]

#: Per-channel normalisation (mean, std) of the training sets (SPEC 2).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class Split:
    """One split of a data set held in memory."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def data_root_from_env() -> Path | None:
    """The real data set named by ``IGRAD_DATA``, or ``None`` when unset or missing."""
    value = os.environ.get("IGRAD_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_dir() else None


def normalization_for(source: str | os.PathLike[str], split: Split | None = None) -> tuple[tuple[float, ...], ...]:
    """(mean, std) for a data source: the CIFAR constants for ``cifar10``/``cifar100`` or a folder
    that holds the 100 CIFAR-100 classes, else computed from ``split`` (the training split)."""
    name = str(source).lower()
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    if split is not None and len(split.classes) == 100 and split.images.shape[-2:] == (32, 32):
        return NORMALIZATION["cifar100"]
    if split is None:
        return NORMALIZATION["imagenet"]
    x = split.images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(mean.tolist()), tuple(std.tolist())


def _cache_dir() -> Path:
    return Path(os.environ.get("IGRAD_CACHE", Path.home() / ".cache" / "igrad"))


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise IgradError(f"cannot read image {path}: {exc}") from exc


def _folder_split(folder: Path) -> Split:
    if not folder.is_dir():
        raise IgradError(f"data folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise IgradError(f"data folder {folder} has no class subfolders (expected {folder}/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for idx, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, idx))
    if not files:
        raise IgradError(f"data folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    key = hashlib.sha256()
    for f, idx in files:
        st = f.stat()
        key.update(f"{f}|{idx}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{folder.name}-{key.hexdigest()[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, [f for f, _ in files]))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise IgradError(
            f"images in {folder} have different sizes {sorted(shapes)[:3]}; resize them first "
            "(in-memory loading needs one size)"
        )
    images = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    labels = np.array([i for _, i in files], dtype=np.int64)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    except OSError:
        pass  # caching is an optimisation only
    return Split(torch.from_numpy(images), torch.from_numpy(labels), classes)


def _torchvision_split(name: str, train: bool, root: Path, download: bool) -> Split:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise IgradError(
            f"{name} not found under {root} ({exc}); pass --download on a machine with internet, "
            "or point --data at an image folder"
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Split(images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


def load_split(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Split:
    """Load ``split`` (``train``, ``test`` or ``val``) of ``source``.

    ``source`` is ``cifar10``/``cifar100`` (torchvision, stored under ``root``, fetched with
    ``download=True``) or an image-folder root holding ``train/`` and ``test/`` (or ``val/``).
    """
    if split not in ("train", "test", "val"):
        raise IgradError(f"unknown split {split!r}; use train, test or val")
    name = str(source).lower()
    if name in ("cifar10", "cifar100") and not Path(source).is_dir():
        base = Path(root) if root is not None else _cache_dir() / "torchvision"
        return _torchvision_split(name, split == "train", base, download)
    base = Path(source).expanduser()
    if not base.is_dir():
        raise IgradError(f"data folder {base} does not exist")
    folder = base / split
    if split != "train" and not folder.is_dir():
        other = base / ("val" if split == "test" else "test")
        folder = other if other.is_dir() else folder
    if not folder.is_dir():
        raise IgradError(f"data folder {base} has no {split}/ subfolder (expected train/ and test/ or val/)")
    return _folder_split(folder)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images/255 − mean) / std`` per channel, float32 (``images``: uint8 ``[B, C, H, W]``, or a float
    tensor already in ``[0, 1]``)."""
    x = images.float().div_(255) if not images.is_floating_point() else images.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s) if x is not images else (x - m) / s


def eval_tensors(
    split: Split,
    mean: Sequence[float],
    std: Sequence[float],
    indices: torch.Tensor | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images ``[N, C, H, W]`` and labels ``[N]`` of ``split`` (or of ``indices`` of it),
    as the model sees them at evaluation (no augmentation)."""
    images, labels = split.images, split.labels
    if indices is not None:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, labels = images[index], labels[index]
    return normalize(images.to(device), mean, std), labels.to(device)
