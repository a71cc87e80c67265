"""Saliency maps of a trained checkpoint for image files.

Writes, under --out: an overlay per image and method (<label>/<image>_<method>.png; JET on the image
for CAM methods, a diverging map for signed gradients), grid.png (rows = images, columns = methods;
with --compare, the two checkpoints' rows side by side: the paper's qualitative figure) and
explain.json (targets, predictions, files, provenance).

Images (PNG, JPEG, BMP, TIFF, ...; 8 or 16 bits; alpha dropped; see igrad.images) are resized to the
model's input size (--size, else the checkpoint's image_shape, else the input size the model registry
gives for the network: 32x32 for the CIFAR networks, 224x224 for torchvision's) and normalised with the
checkpoint's mean/std.

example:
  igrad explain --checkpoint runs/base/last.pt cat.png dog.png --methods gradcam,scorecam --out maps/
  igrad explain --checkpoint runs/base/last.pt --compare runs/reg/last.pt cat.png --out maps/
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import IgradError
from ..images import MAX_PIXELS
from ..normalization import Normalization
from ..validate import positive_int

HELP = "saliency maps (overlays and a grid figure) of a checkpoint for image files"
DEFAULT_METHODS = "gradient,guided,gradcam,scorecam"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``igrad explain``."""
    from ..saliency import METHODS

    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM/PGM; 8- or 16-bit)",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="checkpoint (e.g. RUN/last.pt)")
    parser.add_argument("--compare", metavar="PT", help="a second checkpoint, drawn in a row under the first")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated saliency methods or 'all' (default {DEFAULT_METHODS}); known: {', '.join(METHODS)}",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--target",
        help="class to explain: one index or class name for all images, or one per image (comma-separated); "
        "a class name means that class, an integer that names no class is an index, and a token that is both "
        "(numbered classes) must be written name:TOKEN or index:N; default: the first checkpoint's predicted class",
    )
    parser.add_argument("--target-layer", metavar="NAME", help="dotted module name (default: the model's last stage)")
    parser.add_argument("--size", type=int, metavar="PX", help="resize images to PX x PX (default: see above)")
    parser.add_argument(
        "--batch-size", type=int, help="forward batch of scorecam, ablationcam, smoothgrad (default: each method's own)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help=f"refuse an image whose header declares more than N pixels, before decoding it (default {MAX_PIXELS:,})",
    )


def _load_images(
    paths: list[str], size: tuple[int, int], channels: int = 3, max_pixels: int = MAX_PIXELS
) -> torch.Tensor:
    """Raw pixels in [0, 1], ``[N, channels, H, W]`` (RGB, or grey for 1 channel; :func:`igrad.images.decode_image`,
    so 16-bit files keep their values and alpha is dropped, and a file declaring more than ``max_pixels``
    pixels is refused before decoding; antialiased bilinear resize)."""
    from torchvision.transforms.v2.functional import resize

    from ..images import decode_image, to_unit

    decoded = [decode_image(p, channels, max_pixels=max_pixels) for p in paths]
    return torch.stack([to_unit(resize(image, list(size), antialias=True)) for image in decoded])


#: Prefixes that choose one reading of a --target token: a class index, or a class name.
_INDEX, _NAME = "index:", "name:"


def _class_token(token: str, classes: list[str] | None, num_classes: int | None) -> int:
    """The class index a ``--target`` token names. A class name means that class; an integer that names no
    class is an index (range-checked against ``num_classes``, else the number of names). A token that is a
    class name and also the index of another class (numbered classes sorted as strings: '1', '10', '11',
    '2', ...) is refused naming both readings; ``name:TOKEN`` and ``index:N`` choose one."""
    count = num_classes if num_classes is not None else (len(classes) if classes else None)
    named = classes.index(token) if classes is not None and token in classes else None
    number = int(token) if re.fullmatch(r"-?\d+", token) else None
    in_range = number is not None and (count is None or 0 <= number < count)
    if named is not None:
        if in_range and number != named:
            assert number is not None and classes is not None  # for the type checker: in_range says so
            raise IgradError(
                f"--target {token!r} is ambiguous: it is the name of class {named} and also the index of class "
                f"{number} ({classes[number]!r}); write --target {_NAME}{token} for the class named {token!r} or "
                f"--target {_INDEX}{token} for class index {token}"
            )
        return named
    if token.startswith(_NAME) and classes is not None and token[len(_NAME) :] in classes:
        return classes.index(token[len(_NAME) :])
    if token.startswith(_INDEX) and re.fullmatch(r"-?\d+", token[len(_INDEX) :]):
        number = int(token[len(_INDEX) :])
        in_range = count is None or 0 <= number < count
    if number is not None:
        if not in_range:
            raise IgradError(f"--target class {number} is out of range for a model with {count} classes")
        return number
    raise IgradError(
        f"--target {token!r} is neither a class index nor a class name of the checkpoint"
        + ("" if classes else " (the checkpoint lists no class names)")
    )


def _parse_target(
    text: str | None, n_images: int, classes: list[str] | None, num_classes: int | None = None
) -> list[int] | None:
    """The classes ``--target`` names (:func:`_class_token` per comma-separated token): one for every image or
    one per image; ``None`` when not given."""
    if text is None:
        return None
    out = [_class_token(part.strip(), classes, num_classes) for part in text.split(",")]
    if len(out) == 1:
        return out * n_images
    if len(out) != n_images:
        raise IgradError(f"--target gives {len(out)} classes for {n_images} images (give one, or one per image)")
    return out


def _image_size(config: dict[str, Any], model_name: str) -> tuple[int, int]:
    """``(H, W)`` the model was trained on: the checkpoint's ``image_shape`` ``[C, H, W]`` (or ``image_size``),
    else the registry's input size of the network (:func:`igrad.models.model_info`)."""
    shape = config.get("image_shape")
    if isinstance(shape, list | tuple) and len(shape) == 3:
        return int(shape[1]), int(shape[2])
    size = config.get("image_size")
    if isinstance(size, int):
        return size, size
    from ..models import model_info

    _, h, w = model_info(str(model_name)).input_size
    return h, w


def _normalization(config: dict[str, Any], path: str) -> Normalization:
    """The checkpoint's normalisation (:meth:`Normalization.from_config`); an old config without one gets
    its data set's (:func:`igrad.data.normalization_for`)."""
    if "mean" not in config and "std" not in config and "data" in config:
        from ..data import normalization_for

        return normalization_for(config["data"])
    return Normalization.from_config(config, f"checkpoint {path}")


def _labels(paths: list[str]) -> list[str]:
    """Row labels for checkpoints: their run folder names, made unique."""
    names = [Path(p).resolve().parent.name or Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        names = [Path(p).stem if i == 0 else f"{Path(p).stem} ({i + 1})" for i, p in enumerate(paths)]
    if len(set(names)) < len(names):
        names = ["checkpoint", "compare"][: len(paths)]
    return names


def _device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise IgradError(f"--device {name!r} is not a torch device") from exc


def _classes(config: dict[str, Any]) -> list[str] | None:
    classes = config.get("classes")
    return list(classes) if isinstance(classes, list | tuple) else None


def _inputs(
    args: argparse.Namespace, config: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The images' raw [0, 1] pixels at the model's input size, and that size ``(H, W)``."""
    size_px = positive_int("--size", args.size, optional=True)
    size = (size_px, size_px) if size_px else _image_size(config, config.get("model", ""))
    max_pixels = positive_int("--max-pixels", args.max_pixels)
    return _load_images(args.images, size, _channels(config), max_pixels).to(device), size


def _write_maps(
    out: Path, rows: list[tuple[str, Any]], raw: torch.Tensor, paths: list[str], size: tuple[int, int]
) -> list[str]:
    """An overlay per checkpoint, image and method (``out/<label>/<image>_<method>.png``); the files written."""
    from ..visualize import render, save_image

    files = []
    scale = max(1, 224 // min(size))
    for label, exps in rows:
        for i, stem in enumerate(_unique_stems(paths)):
            for name, exp in exps.items():
                f = out / _safe(label) / f"{stem}_{_safe(name)}.png"
                save_image(f, render(exp, raw, i), scale=scale)
                files.append(str(f))
    return files


def _channels(config: dict[str, Any]) -> int:
    shape = config.get("image_shape")
    return int(shape[0]) if isinstance(shape, list | tuple) and len(shape) == 3 else 3


def _check_comparable(
    configs: list[dict[str, Any]], norms: list[Normalization], paths: list[str], *, size_given: bool
) -> None:
    """The --compare checkpoint must read the same inputs and name the same classes as the first: the images
    are prepared (channels, size unless --size gives it, normalisation) and the target classes named from the
    first checkpoint alone, so any difference would draw the second model's maps of wrong inputs or of another
    class. Clear error otherwise."""
    first, norm0, path0 = configs[0], norms[0], paths[0]
    for config, norm, path in zip(configs[1:], norms[1:], paths[1:], strict=True):
        differences = []
        if config.get("num_classes") != first.get("num_classes"):
            differences.append(f"{config.get('num_classes')} classes vs {first.get('num_classes')}")
        elif _classes(config) and _classes(first) and _classes(config) != _classes(first):
            differences.append("different class names (or order)")
        if _channels(config) != _channels(first):
            differences.append(f"{_channels(config)} image channels vs {_channels(first)}")
        if not size_given:
            size, size0 = _image_size(config, config.get("model", "")), _image_size(first, first.get("model", ""))
            if size != size0:
                differences.append(f"input size {size} vs {size0}")
        if (norm.mean, norm.std) != (norm0.mean, norm0.std):
            differences.append(f"normalisation mean/std {norm.mean}/{norm.std} vs {norm0.mean}/{norm0.std}")
        if differences:
            raise IgradError(
                f"--compare {path} cannot be drawn beside {path0}: "
                + "; ".join(differences)
                + " (both rows use the first checkpoint's inputs and classes)"
            )


def run(args: argparse.Namespace) -> int:
    """Compute the maps, write overlays, the grid figure and explain.json."""
    from ..atomic import atomic_write_json
    from ..checkpoint import load_model
    from ..output import model_logits
    from ..provenance import provenance
    from ..saliency import METHODS, resolve_methods
    from ..visualize import class_label, explain, explanation_figure, method_options, save_figure

    methods = resolve_methods(args.methods)
    options = {} if args.batch_size is None else {"batch_size": positive_int("--batch-size", args.batch_size)}
    device = _device(args.device)
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    loaded = [load_model(p, map_location=device) for p in paths]
    configs = [config for _, config in loaded]
    norms = [_normalization(config, p) for config, p in zip(configs, paths, strict=True)]
    _check_comparable(configs, norms, paths, size_given=args.size is not None)
    config0 = configs[0]
    raw, size = _inputs(args, config0, device)
    x = norms[0].apply(raw)
    classes = _classes(config0)
    count = config0.get("num_classes")
    target = _parse_target(args.target, len(args.images), classes, count if isinstance(count, int) else None)
    with torch.no_grad():
        predicted = [model_logits(m, x).argmax(1).tolist() for m, _ in loaded]
    if target is None:
        target = predicted[0]  # the same class for every checkpoint, so that the rows compare like with like
    kwargs = {name: method_options(name, **options) for name in methods}
    labels = _labels(paths)
    rows = [
        (label, explain(model, x, target, methods, target_layer=args.target_layer, method_kwargs=kwargs))
        for label, (model, _config) in zip(labels, loaded, strict=True)
    ]
    out = Path(args.out)
    files = _write_maps(out, rows, raw, args.images, size)
    predictions = {label: torch.tensor(p) for label, p in zip(labels, predicted, strict=True)}
    figure = explanation_figure(raw.cpu(), rows, class_names=classes, predictions=predictions)
    save_figure(figure, out / "grid.png")
    files.append(str(out / "grid.png"))
    summary = {
        "checkpoints": dict(zip(labels, paths, strict=True)),
        "images": list(args.images),
        "image_size": list(size),
        "methods": methods,
        "signed": {n: METHODS[n].signed for n in methods},
        "target": target,
        "predicted": dict(zip(labels, predicted, strict=True)),
        "class_names": [class_label(t, classes) for t in target] if classes else None,
        "predicted_names": {k: [class_label(c, classes) for c in v] for k, v in zip(labels, predicted, strict=True)}
        if classes
        else None,
        "files": files,
        "provenance": provenance({"command": "explain", **vars(args)}),
    }
    atomic_write_json(out / "explain.json", summary)
    print(f"wrote {len(files)} images to {out} (grid: {out / 'grid.png'})")
    return 0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _unique_stems(paths: list[str]) -> list[str]:
    stems: list[str] = []
    for p in paths:
        stem = _safe(Path(p).stem)
        base, k = stem, 2
        while stem in stems:
            stem, k = f"{base}_{k}", k + 1
        stems.append(stem)
    return stems
