"""Reading image files: the one decoder behind every way images enter igrad (``igrad explain``'s files and
the image folders of ``train``/``evaluate``/``reproduce``).

:func:`decode_image` returns the file's exact integer pixels, ``uint8`` for 8-bit files and ``uint16``
for 16-bit ones; :func:`to_unit` maps them to ``[0, 1]`` (``v / 255`` or ``v / 65535``). What it reads:

* PNG and JPEG through ``torchvision.io.decode_image`` (every PNG colour type and bit depth: 1/2/4/8-bit,
  16-bit grey, grey+alpha, RGB and RGBA as ``uint16``, palettes with and without transparency; Pillow
  keeps only 8 bits of 16-bit colour PNGs). torchvision 0.29 marks its image decoders deprecated in
  favour of TorchCodec's; they are used here while torchvision is pinned to 0.29;
* the other formats Pillow opens (BMP, PPM/PGM, TIFF, WebP, GIF, ...) through Pillow, in the modes
  ``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``RGBX``, ``CMYK``, ``YCbCr`` (8 bits; CMYK and
  YCbCr with Pillow's conversion to RGB) and ``I;16`` (16-bit grey).

**Alpha is dropped**: the colour channels are used as stored (no compositing on a background), as
torchvision's ``ImageReadMode.RGB`` and Pillow's ``convert("RGB")`` do; a palette image gives its
palette colours. Grey images are repeated into three channels; for one-channel models colour images are
turned into luma (ITU-R 601-2). Refused with an :class:`~igrad.errors.IgradError` naming the file:
files that are not images, truncated or corrupt files, 32-bit integer and floating-point images
(modes ``I``, ``F``: their ``[0, 1]`` range is unknown), 16-bit colour TIFFs (Pillow would keep only
8 of their bits) and other modes.

**Pixel limit**: an image whose header declares more than ``max_pixels`` pixels (default
:data:`MAX_PIXELS`, 64 megapixels; ``igrad explain``/``evaluate``/``train``/``reproduce --max-pixels``) is
refused in one line naming the file, its size and the limit, from the header alone, before any pixel is
decoded: a file of a few hundred kilobytes may declare 20,000 × 20,000 pixels (a decompression bomb) and
would otherwise allocate gigabytes. Pillow's own decompression-bomb refusal (``Image.DecompressionBombError``,
above twice ``PIL.Image.MAX_IMAGE_PIXELS``) is reported the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import IgradError
from .validate import positive_int

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DECODER_VERSION", "MAX_PIXELS", "decode_image", "check_pixels", "to_unit"]

#: Changes whenever decoded values change (the image-folder cache key includes it, so no cache keeps
#: pixels decoded by an older version). 2: 16-bit images kept as uint16 (version 1 clipped them to 255).
DECODER_VERSION = 2

#: The default pixel limit of :func:`decode_image`: 64 megapixels (8000 × 8000), far above any image igrad's
#: networks read, far below what a decompression bomb declares.
MAX_PIXELS = 64_000_000

_TORCHVISION_FORMATS = ("PNG", "JPEG")
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_MAX_VALUE = {torch.uint8: 255, torch.uint16: 65535}
_FIX = "save it as an 8- or 16-bit PNG"


def decode_image(path: str | os.PathLike[str], channels: int = 3, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The pixels of the image file ``path`` as ``[channels, H, W]`` (``channels`` 3: RGB, 1: grey),
    ``uint8`` for 8-bit files and ``uint16`` for 16-bit ones; alpha dropped (module docstring).
    ``max_pixels``: the largest ``W·H`` accepted (a positive integer), checked from the header before
    anything is decoded (:func:`check_pixels`); Pillow's own decompression-bomb limit applies too.
    Raises :class:`IgradError` naming the file for anything it cannot read exactly."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise IgradError(f"images are decoded to 1 (grey) or 3 (RGB) channels, not {channels}")
    positive_int("max_pixels", max_pixels)
    path = Path(path)
    if not path.is_file():
        raise IgradError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            check_pixels(path, im.size, max_pixels)
            if im.format in _TORCHVISION_FORMATS:
                return _decode_torchvision(path, channels)
            return _decode_pil(im, path, channels)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked as it opens the header
        size = _declared_size(path)
        if size is not None:
            check_pixels(path, size, max_pixels)  # over igrad's limit too: refused as such
        pixels = f"{size[0]}×{size[1]} = {size[0] * size[1]:,}" if size is not None else "over"
        raise IgradError(
            f"image {path} ({_file_size(path)}) is {pixels} pixels, more than Pillow's decompression-bomb limit "
            f"of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (twice PIL.Image.MAX_IMAGE_PIXELS); refused before "
            "decoding"
        ) from exc
    except UnidentifiedImageError as exc:
        raise IgradError(f"cannot read image {path}: it is not an image file (PNG, JPEG, BMP, TIFF, ...)") from exc
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:
        if isinstance(exc, IgradError):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IgradError(f"cannot read image {path}: it is truncated or corrupt ({detail})") from exc


def check_pixels(path: str | os.PathLike[str], size: tuple[int, int], max_pixels: int) -> None:
    """Refuse image ``path`` of ``size`` ``(W, H)`` (from its header) when ``W·H > max_pixels``: one line
    naming the file, its size on disk, its pixels and the limit."""
    w, h = size
    if w * h > max_pixels:
        raise IgradError(
            f"image {path} ({_file_size(path)}) declares {w}×{h} = {w * h:,} pixels, more than the limit of "
            f"{max_pixels:,} (max_pixels, --max-pixels); refused before decoding"
        )


def _file_size(path: str | os.PathLike[str]) -> str:
    """``"389 KB"``: the file's size on disk, for messages."""
    try:
        n = os.path.getsize(path)
    except OSError:
        return "size unknown"
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.0f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def _declared_size(path: Path) -> tuple[int, int] | None:
    """``(W, H)`` as the file's header declares it, read by the Pillow plugin that accepts the file, without
    Pillow's decompression-bomb check (which refuses to say the size); ``None`` when no plugin reads it."""
    from PIL import Image

    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            if accept is not None and accept(prefix) is not True:
                continue
            fp.seek(0)
            try:
                im = factory(fp, str(path))
            except Exception:  # a plugin that cannot read it: try the next, as Pillow does
                continue
            return im.size
    return None


def _decode_torchvision(path: Path, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, read_file
    from torchvision.io import decode_image as tv_decode

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        return tv_decode(read_file(str(path)), mode=mode)
    except RuntimeError as exc:
        # torchvision's messages start with its C++ function and source location: keep the reason
        reason = re.sub(r"^[^,]*, [^,]*:\d+, ", "", str(exc).strip()) or "decoding failed"
        raise IgradError(f"cannot read image {path}: it is truncated or corrupt ({reason})") from exc


def _decode_pil(im: Image.Image, path: Path, channels: int) -> torch.Tensor:
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = torch.from_numpy(np.asarray(im).astype(np.uint16))[None]
        return grey.expand(channels, -1, -1).contiguous()
    if mode not in _EIGHT_BIT_MODES:
        kinds = {"I": "32-bit integer (e.g. a 16-bit PGM or a 32-bit TIFF)", "F": "floating-point"}
        what = f"holds {kinds[mode]} pixels, whose [0, 1] range igrad cannot know" if mode in kinds else "is not read"
        raise IgradError(f"image {path} ({im.format}, Pillow mode {mode}) {what}; {_FIX}")
    bits = getattr(im, "tag_v2", {}).get(258) if im.format == "TIFF" else None  # TIFF BitsPerSample
    if bits is not None and max(np.atleast_1d(bits)) > 8:
        raise IgradError(
            f"image {path} is a {max(np.atleast_1d(bits))}-bit colour TIFF, of which Pillow reads only 8 bits; {_FIX}"
        )
    if "A" in mode or "a" in mode or "transparency" in im.info:
        im = im.convert("RGBA")  # alpha (or a palette's transparency) made explicit, then dropped below
    arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).copy()).permute(2, 0, 1).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Pixels in ``[0, 1]``: ``uint8`` divided by 255, ``uint16`` by 65535 (a correctly rounded division,
    as igrad has always normalised), as ``float32``; floating-point tensors (already in ``[0, 1]``) are
    returned in float32 at least (``float64`` kept, narrower floats widened)."""
    if images.is_floating_point():
        return images.to(torch.promote_types(images.dtype, torch.float32))
    if images.dtype not in _MAX_VALUE:
        raise IgradError(f"images must be uint8, uint16 or floating point, got {images.dtype}")
    return images.float().div_(_MAX_VALUE[images.dtype])
