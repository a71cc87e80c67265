"""Data sets: CIFAR-10/100 through torchvision, or any image folder, as in-memory integer tensors.

Small-image data sets fit in memory, and decoding PNGs is the slow part of loading them on a CPU
machine, so a split is decoded once (:func:`igrad.images.decode_image`) into ``images``
``uint8 [N, C, H, W]`` (``uint16`` when the folder holds a 16-bit image) and ``labels`` ``int64 [N]``
(cached on disk under ``$IGRAD_CACHE``, default ``~/.cache/igrad``, keyed by the folder's path, file
list, modification times and the decoder's version). Image folders follow torchvision's ``ImageFolder``
rules, so the class index is the position of the class name in sorted order; for the CIFAR-100 copy
this equals the official fine label (its README). Where a folder meets a trained model (evaluation),
:func:`match_classes` renumbers its labels to the model's classes by name.

``IGRAD_DATA`` names the real data (an image-folder root with ``train/`` and ``test/``) for tests,
benchmarks and the demo.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import IgradError, unknown_name
from .images import DECODER_VERSION, MAX_PIXELS, decode_image, to_unit
from .normalization import NORMALIZATIONS, Normalization
from .validate import positive_int

__all__ = [
    "Split",
    "TrainData",
    "load_split",
    "load_train_data",
    "holdout_split",
    "cos_subset",
    "data_root_from_env",
    "normalization_for",
    "eval_tensors",
    "match_classes",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@dataclass
class Split:
    """One split of a data set held in memory."""

    images: torch.Tensor  # uint8 [N, C, H, W] (uint16 for 16-bit images)
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


def normalization_for(
    source: str | os.PathLike[str], split: Split | None = None, name: str | None = None
) -> Normalization:
    """The normalisation of a data source, by one rule (no guessing from the images' shape):

    * ``source`` names a data set (``cifar10``, ``cifar100``: torchvision's): its constants (docs/method.md §Networks
    and recipes);
    * else ``name``, one of :data:`igrad.normalization.NORMALIZATIONS` (e.g. ``cifar100`` for the CIFAR-100
      image-folder copy), or ``"data"``;
    * else (or for ``"data"``) computed from ``split``, the training split: per-channel mean and std of
      its [0, 1] pixels.
    """
    known = str(source).lower()
    if known in ("cifar10", "cifar100") and not Path(source).is_dir():
        return NORMALIZATIONS[known]
    if name is not None and name != "data":
        if name not in NORMALIZATIONS:
            raise unknown_name("normalization", name, [*NORMALIZATIONS, "data"])
        return NORMALIZATIONS[name]
    if split is None:
        raise IgradError(f"the normalisation of {source} is computed from its training split; none was given")
    x = to_unit(split.images)
    return Normalization.of(x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist())


def _cache_dir() -> Path:
    return Path(os.environ.get("IGRAD_CACHE", Path.home() / ".cache" / "igrad"))


def _folder_split(folder: Path, max_pixels: int = MAX_PIXELS) -> Split:
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
    key = hashlib.sha256(f"decoder {DECODER_VERSION}\n".encode())
    for f, idx in files:
        st = f.stat()
        key.update(f"{f}|{idx}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{folder.name}-{key.hexdigest()[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                cached = Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]), classes)
        except (OSError, ValueError, KeyError):
            cached = None  # a damaged cache is rebuilt below
        if cached is not None:
            h, w = cached.images.shape[-2:]
            if h * w > max_pixels:  # decoded under a larger limit: the same refusal as a fresh decode
                raise IgradError(
                    f"the images of {folder} are {w}×{h} = {h * w:,} pixels, more than the limit of "
                    f"{max_pixels:,} (max_pixels, --max-pixels)"
                )
            return cached
    decode = functools.partial(decode_image, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, [f for f, _ in files]))
    shapes = {tuple(a.shape[1:]) for a in decoded}
    if len(shapes) != 1:
        raise IgradError(
            f"images in {folder} have different sizes {sorted(shapes)[:3]}; resize them first "
            "(in-memory loading needs one size)"
        )
    if any(a.dtype == torch.uint16 for a in decoded):  # 8-bit images join 16-bit ones exactly: v·257/65535 = v/255
        decoded = [a if a.dtype == torch.uint16 else (a.to(torch.int32) * 257).to(torch.uint16) for a in decoded]
    images = torch.stack(decoded).numpy()
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
    except OSError as exc:  # urllib's URLError and socket errors: no internet, or the server unreachable
        raise IgradError(
            f"could not download {name} into {root}: {exc}; on a machine without internet point --data (or "
            "IGRAD_DATA) at the CIFAR image-folder copy"
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return Split(images, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


def load_split(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Split:
    """Load ``split`` (``train``, ``test`` or ``val``) of ``source``.

    ``source`` is ``cifar10``/``cifar100`` (torchvision, stored under ``root``, fetched with
    ``download=True``) or an image-folder root holding ``train/`` and ``test/`` (or ``val/``), whose
    files are refused when their headers declare more than ``max_pixels`` pixels
    (:func:`igrad.images.decode_image`, before anything is decoded).
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
    return _folder_split(folder, positive_int("max_pixels", max_pixels))


def eval_tensors(
    split: Split,
    normalization: Normalization,
    indices: torch.Tensor | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images ``[N, C, H, W]`` and labels ``[N]`` of ``split`` (or of ``indices`` of it),
    as the model sees them at evaluation (no augmentation)."""
    images, labels = split.images, split.labels
    if indices is not None:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, labels = images[index], labels[index]
    return normalization.apply(images.to(device)), labels.to(device)


# -- the splits of a training run ----------------------------------------------------------------------


@dataclass
class TrainData:
    """The splits of a training run and their normalisation."""

    train: Split
    test: Split
    val: Split | None
    normalization: Normalization

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return self.train.classes


def _subset(split: Split, index: torch.Tensor) -> Split:
    return Split(split.images[index], split.labels[index], split.classes)


def holdout_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """``(rest, held out)``: per class ``c``, ``round(fraction · n_c)`` samples chosen by a permutation seeded
    with ``seed`` are held out (a stratified validation split; both parts keep the original order)."""
    g = torch.Generator().manual_seed(seed)
    labels = split.labels
    perm = torch.randperm(len(labels), generator=g)
    held = []
    for c in labels.unique().tolist():
        members = perm[labels[perm] == c]
        held.append(members[: round(fraction * len(members))])
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_idx] = False
    return _subset(split, keep.nonzero().squeeze(1)), _subset(split, held_idx)


def cos_subset(n: int, samples: int, seed: int) -> torch.Tensor:
    """The fixed, seeded subset (sorted indices) of ``min(samples, n)`` images for the cos diagnostic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(samples, n)].sort().values


def _check_splits(source: str | os.PathLike[str], train: Split, test: Split) -> None:
    if train.classes != test.classes:
        first = next((a, b) for a, b in zip(train.classes + [""], test.classes + [""], strict=False) if a != b)
        raise IgradError(
            f"the train and test splits of {source} have different classes "
            f"({len(train.classes)} vs {len(test.classes)}; first difference: {first})"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise IgradError(
            f"train images are {tuple(train.images.shape[1:])} but test images {tuple(test.images.shape[1:])}"
        )


def load_train_data(
    source: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    normalization: Normalization | str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> TrainData:
    """The training and test splits of ``source`` (:func:`load_split`) and, with ``val_fraction > 0``, a
    validation split held out of the training set (:func:`holdout_split` with ``split_seed``: the same for
    every training seed, λ and network). ``normalization``: the object itself, or a name for
    :func:`normalization_for`. ``max_pixels``: the pixel limit of image files (:func:`load_split`)."""
    train = load_split(source, "train", root=root, download=download, max_pixels=max_pixels)
    test = load_split(source, "test", root=root, download=download, max_pixels=max_pixels)
    _check_splits(source, train, test)
    norm = (
        normalization if isinstance(normalization, Normalization) else normalization_for(source, train, normalization)
    )
    if norm.channels != train.images.shape[1]:
        raise IgradError(
            f"the normalisation (mean {norm.mean}, std {norm.std}) has {norm.channels} channels but the images "
            f"of {source} have {train.images.shape[1]}; use --normalization data or give --mean and --std"
        )
    val = None
    if val_fraction > 0:
        train, val = holdout_split(train, val_fraction, split_seed)
        if len(val) == 0:
            raise IgradError(f"val_fraction {val_fraction} holds out no image of {len(train)}")
    return TrainData(train, test, val, norm)


def match_classes(
    split: Split,
    classes: Sequence[str] | None,
    num_classes: int,
    *,
    source: str = "the data",
    model: str = "the model",
) -> Split:
    """``split`` with its labels renumbered to a trained model's class indices, matched by name.

    ``classes`` are the model's class names in output order (a checkpoint's ``config["classes"]``). The
    split may hold any subset of them, in any order (an image folder numbers its own classes by sorted
    position); a class name the model does not know is refused (:class:`IgradError` naming it, with
    close matches). The returned split's ``classes`` are the model's. Without names (``None``: an older
    checkpoint) the classes are matched by position, with a warning, and only when the split has
    exactly ``num_classes`` of them. ``source`` and ``model`` name the two sides in messages.
    """
    if classes is None:
        if len(split.classes) != num_classes:
            raise IgradError(
                f"{model} stores no class names and has {num_classes} classes, but {source} has "
                f"{len(split.classes)} ({_few(split.classes)}), so its labels cannot be matched to the model's "
                "outputs; use data with exactly the model's classes, or a checkpoint that names them "
                "(igrad train stores them)"
            )
        warnings.warn(
            f"{model} stores no class names: the {num_classes} classes of {source} are matched to its outputs "
            "by sorted position",
            stacklevel=2,
        )
        return split
    known = [str(c) for c in classes]
    if len(known) != num_classes:
        raise IgradError(f"{model} names {len(known)} classes but has {num_classes} outputs")
    index = {name: i for i, name in enumerate(known)}
    unknown = [c for c in split.classes if c not in index]
    if unknown:
        hints = []
        for name in unknown[:5]:
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise IgradError(
            f"{source} has class(es) {', '.join(hints)}{more} that {model} does not know; its {len(known)} classes: "
            f"{_few(known)}. Rename or remove those class folders"
        )
    if split.classes == known:
        return split
    lut = torch.tensor([index[c] for c in split.classes], dtype=torch.long)
    return Split(split.images, lut[split.labels], known)


def _few(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
