"""Image decoding: every way images enter igrad (``igrad explain``'s files, the image
folders of train/evaluate) gives the right [0, 1] pixels for 8- and 16-bit grey, grey+alpha, RGB, RGBA,
palette and 1-bit files, and refuses what it cannot read with a message naming the file.

References are written into this file: the pixel values each file is made from (PIL, or a hand-written
PNG/TIFF encoder for the 16-bit colour files PIL cannot write), divided by 255 or 65535 by hand.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import igrad
import igrad.data
from igrad.checkpoint import save_checkpoint
from igrad.cli import main
from igrad.data import eval_tensors, load_split
from igrad.errors import IgradError
from igrad.images import decode_image
from igrad.normalization import Normalization

SIZE = 8
EXACT = 1e-6  # far below 1/65535 ≈ 1.5e-5: a value cut to 8 bits misses by up to 1/256
RNG = np.random.default_rng(7)
GREY16 = RNG.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
GREY16[0, :6] = [0, 1, 255, 256, 28836, 65535]  # 28836/65535 = 0.440 (the scan mean)
GREY8 = RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
ALPHA8 = RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
ALPHA8[0, 0] = 0  # a fully transparent pixel keeps its colour (alpha is dropped, not composited)
RGB16 = RNG.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16)
ALPHA16 = RNG.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
BITS = RNG.integers(0, 2, (SIZE, SIZE)).astype(bool)
PALETTE = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [7, 8, 9]], dtype=np.uint8)
INDEX = RNG.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray, color_type: int) -> None:
    """A PNG written by hand (IHDR, one zlib IDAT, filter 0): PIL writes no 16-bit colour PNGs."""
    bits = 16 if arr.dtype == np.uint16 else 8
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2" if bits == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bits, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def _tiff_rgb16(path: Path, arr: np.ndarray) -> None:
    """An uncompressed little-endian 16-bit RGB TIFF written by hand (one strip): header, 10 IFD entries
    (type 3 SHORT, 4 LONG; a single SHORT is left-justified in the 4-byte value), BitsPerSample at 134,
    pixels at 140."""
    h, w, _ = arr.shape
    shorts = [(256, w), (257, h), (259, 1), (262, 2), (277, 3), (278, h), (284, 1)]
    entries = [(tag, struct.pack("<HHIHH", tag, 3, 1, value, 0)) for tag, value in shorts]
    entries += [(258, struct.pack("<HHII", 258, 3, 3, 134)), (273, struct.pack("<HHII", 273, 4, 1, 140))]
    entries += [(279, struct.pack("<HHII", 279, 4, 1, arr.nbytes))]
    ifd = struct.pack("<H", len(entries)) + b"".join(e for _, e in sorted(entries)) + struct.pack("<I", 0)
    head = b"II*\x00" + struct.pack("<I", 8) + ifd
    assert len(head) == 134
    path.write_bytes(head + struct.pack("<3H", 16, 16, 16) + arr.astype("<u2").tobytes())


def _palette_image() -> Image.Image:
    im = Image.fromarray(INDEX, "P")
    im.putpalette(PALETTE.flatten().tolist())
    return im


def _grey3(values: np.ndarray, scale: float) -> np.ndarray:
    return np.repeat(values[..., None].astype(np.float64) / scale, 3, axis=2)


# name -> (writer, expected [H, W, 3] in [0, 1], computed by hand from the values written)
GOOD = {
    "grey16.png": (lambda p: Image.fromarray(GREY16).save(p), _grey3(GREY16, 65535)),
    "grey8.png": (lambda p: Image.fromarray(GREY8).save(p), _grey3(GREY8, 255)),
    "bilevel.png": (lambda p: Image.fromarray(BITS).save(p), _grey3(BITS.astype(np.uint8), 1)),
    "grey_alpha8.png": (
        lambda p: Image.fromarray(np.stack([GREY8, ALPHA8], -1), "LA").save(p),
        _grey3(GREY8, 255),
    ),
    "rgb8.png": (lambda p: Image.fromarray(RGB8).save(p), RGB8 / 255),
    "rgba8.png": (lambda p: Image.fromarray(np.dstack([RGB8, ALPHA8]), "RGBA").save(p), RGB8 / 255),
    "palette.png": (lambda p: _palette_image().save(p), PALETTE[INDEX] / 255),
    "palette_transparent.png": (lambda p: _palette_image().save(p, transparency=1), PALETTE[INDEX] / 255),
    "rgb16.png": (lambda p: _png(p, RGB16, 2), RGB16 / 65535),
    "rgba16.png": (lambda p: _png(p, np.dstack([RGB16, ALPHA16]), 6), RGB16 / 65535),
    "grey_alpha16.png": (lambda p: _png(p, np.stack([GREY16, ALPHA16], -1), 4), _grey3(GREY16, 65535)),
    "grey16.tif": (lambda p: Image.fromarray(GREY16).save(p), _grey3(GREY16, 65535)),
    "rgba8.tif": (lambda p: Image.fromarray(np.dstack([RGB8, ALPHA8]), "RGBA").save(p), RGB8 / 255),
    "rgb8.bmp": (lambda p: Image.fromarray(RGB8).save(p), RGB8 / 255),
    "palette.gif": (lambda p: _palette_image().save(p), PALETTE[INDEX] / 255),
}

BAD = {  # name -> (writer, words of the message besides the file name)
    "text.png": (lambda p: p.write_text("hello, not an image"), "not an image file"),
    "truncated.png": (lambda p: p.write_bytes(_truncated_png(p)), "truncated or corrupt"),
    "float.tif": (lambda p: Image.fromarray(GREY16.astype(np.float32) / 65535).save(p), "floating-point"),
    "int32.tif": (lambda p: Image.fromarray(GREY16.astype(np.int32)).save(p), "32-bit integer"),
    "rgb16.tif": (lambda p: _tiff_rgb16(p, RGB16), "16-bit colour TIFF"),
}


def _truncated_png(path: Path) -> bytes:
    Image.fromarray(RGB8).save(path)
    return path.read_bytes()[:60]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGRAD_CACHE", str(tmp_path / "cache"))


def _write(folder: Path, names, table) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        table[name][0](folder / name)
        paths.append(folder / name)
    return paths


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=3, width=0.125)
    config = {
        "model": "cifar_resnet18",
        "model_kwargs": {"width": 0.125},
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "image_shape": [3, SIZE, SIZE],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path


def _explain_pixels(tmp_path: Path, files: list[Path], monkeypatch) -> torch.Tensor:
    """The [0, 1] pixels ``igrad explain`` normalises (recorded at igrad.normalization.Normalization.apply)."""
    seen = []
    real = Normalization.apply

    def record(self, raw):
        seen.append(raw.detach().cpu().clone())
        return real(self, raw)

    monkeypatch.setattr(Normalization, "apply", record)
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    argv = [
        "explain",
        "--checkpoint",
        str(ckpt),
        *map(str, files),
        "--methods",
        "gradient",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    return seen[0]


def test_explain_decodes_every_kind_to_its_values(tmp_path, monkeypatch):
    names = list(GOOD)
    raw = _explain_pixels(tmp_path, _write(tmp_path / "in", names, GOOD), monkeypatch)
    assert raw.shape == (len(names), 3, SIZE, SIZE)
    for i, name in enumerate(names):
        np.testing.assert_allclose(raw[i].permute(1, 2, 0).double().numpy(), GOOD[name][1], atol=EXACT, err_msg=name)
    assert raw[0, 0, 0, 4].item() == pytest.approx(0.440, abs=1e-4)  # the 16-bit scan is not all white


def test_image_folder_decodes_every_kind_to_its_values(tmp_path):
    names = sorted(n for n in GOOD if not n.endswith(".gif"))  # sorted, as the loader reads; it skips GIFs
    _write(tmp_path / "data" / "test" / "x", names, GOOD)
    split = load_split(tmp_path / "data", "test")
    assert split.images.dtype == torch.uint16  # a 16-bit file in the folder: every image kept at 16 bits
    x, _ = eval_tensors(split, Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    for i, name in enumerate(names):
        np.testing.assert_allclose(x[i].permute(1, 2, 0).double().numpy(), GOOD[name][1], atol=EXACT, err_msg=name)


def test_eight_bit_folder_stays_uint8_and_jpeg_is_close(tmp_path):
    names = ["grey8.png", "rgb8.png", "palette_transparent.png"]
    _write(tmp_path / "data" / "test" / "x", names, GOOD)
    Image.fromarray(np.full((SIZE, SIZE, 3), (200, 100, 50), np.uint8)).save(tmp_path / "data/test/x/z.jpg", quality=95)
    split = load_split(tmp_path / "data", "test")
    assert split.images.dtype == torch.uint8
    x, _ = eval_tensors(split, Normalization((0.0,) * 3, (1.0,) * 3))
    for i, name in enumerate(sorted(names)):
        np.testing.assert_allclose(x[i].permute(1, 2, 0).double().numpy(), GOOD[name][1], atol=EXACT, err_msg=name)
    np.testing.assert_allclose(x[3].mean((1, 2)).numpy(), [200 / 255, 100 / 255, 50 / 255], atol=3 / 255)  # lossy


def test_grey_decoding_for_one_channel_models(tmp_path):
    GOOD["grey16.png"][0](tmp_path / "g.png")
    got = decode_image(tmp_path / "g.png", channels=1)
    assert got.dtype == torch.uint16 and got.shape == (1, SIZE, SIZE)
    assert np.array_equal(got[0].numpy(), GREY16)
    GOOD["grey_alpha8.png"][0](tmp_path / "la.png")
    assert np.array_equal(decode_image(tmp_path / "la.png", channels=1)[0].numpy(), GREY8)


@pytest.mark.parametrize("name", list(BAD))
def test_unreadable_files_are_refused_naming_the_file(tmp_path, monkeypatch, capsys, name):
    path = _write(tmp_path / "data" / "test" / "x", [name], BAD)[0]
    _write(tmp_path / "data" / "test" / "x", ["rgb8.png"], GOOD)
    words = BAD[name][1]
    with pytest.raises(IgradError, match=words) as info:
        load_split(tmp_path / "data", "test")
    assert str(path) in str(info.value)
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    assert main(["explain", "--checkpoint", str(ckpt), str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and "Traceback" not in err
    assert not (tmp_path / "o" / "explain.json").exists()


def test_cache_of_an_older_decoder_is_not_reused(tmp_path, monkeypatch):
    """Version 1 of the loader clipped 16-bit images to 255 and keyed its cache on path, label, size and
    mtime only; such a cache file must not be read back."""
    folder = tmp_path / "data" / "test"
    path = _write(folder / "x", ["grey16.png"], GOOD)[0]
    st = path.stat()
    old_key = hashlib.sha256(f"{path}|0|{st.st_size}|{st.st_mtime_ns}\n".encode()).hexdigest()[:16]
    stale = tmp_path / "cache" / f"test-{old_key}.npz"
    stale.parent.mkdir(parents=True)
    np.savez(stale, images=np.full((1, 3, SIZE, SIZE), 255, np.uint8), labels=np.zeros(1, np.int64))
    x, _ = eval_tensors(load_split(tmp_path / "data", "test"), Normalization((0.0,) * 3, (1.0,) * 3))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).double().numpy(), GOOD["grey16.png"][1], atol=EXACT)

    # the new cache holds the 16-bit values: read back without decoding
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(igrad.data, "decode_image", no_decoding)
    again = load_split(tmp_path / "data", "test")
    assert again.images.dtype == torch.uint16 and np.array_equal(again.images[0, 1].numpy(), GREY16)


def test_training_reads_sixteen_bit_images_at_full_precision(tmp_path):
    """Training's augmentation takes the uint16 images a 16-bit folder gives: with the same draws, an 8-bit
    batch ``u`` and the same batch at 16 bits (``u · 257``) are augmented to the same [0, 1] values, and
    the computed normalisation of a 16-bit folder is the hand-computed mean of ``v / 65535``."""
    from igrad.data import normalization_for
    from igrad.train.augment import augment

    u8 = torch.from_numpy(np.stack([RGB8, np.dstack([GREY8] * 3)]).transpose(0, 3, 1, 2).copy())
    u16 = (u8.to(torch.int32) * 257).to(torch.uint16)
    a = augment(u8, generator=torch.Generator().manual_seed(3))
    b = augment(u16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, a, atol=EXACT, rtol=0)
    _write(tmp_path / "data" / "train" / "x", ["grey16.png"], GOOD)
    mean = normalization_for(tmp_path / "data", load_split(tmp_path / "data", "train")).mean
    assert mean == pytest.approx([GREY16.mean() / 65535] * 3, abs=1e-6)


# -- hostile files: a header that declares more pixels than the file could hold --------------------------


def _declaring(path: Path, width: int, height: int, fmt: str = "PNG") -> Path:
    """A real 4×4 image whose header is patched to declare ``width × height``: PNG (IHDR at bytes 16-24, its
    CRC over type and data recomputed here) or BMP (BITMAPINFOHEADER width/height at bytes 18-26). The file
    stays tiny: a decoder that trusted the header would allocate ``3·width·height`` bytes."""
    Image.fromarray(RGB8[:4, :4]).save(path, fmt)
    data = bytearray(path.read_bytes())
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    else:
        data[18:26] = struct.pack("<ii", width, height)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail if any pixel is decoded (both decoders of igrad.images)."""

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(igrad.images, "_decode_torchvision", refuse)
    monkeypatch.setattr(igrad.images, "_decode_pil", refuse)


@pytest.mark.parametrize(
    ("width", "height", "fmt"),
    [
        (20000, 20000, "PNG"),  # beyond Pillow's own bomb limit (2 × 89.5 MP): Pillow refuses to open it
        (10000, 8000, "PNG"),  # between igrad's 64 MP and Pillow's limits: Pillow would open it lazily
        (30000, 30000, "BMP"),  # a format Pillow decodes itself
        (9000, 9000, "BMP"),
    ],
)
def test_a_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path, no_decoding, width, height, fmt):
    path = _declaring(tmp_path / f"bomb.{fmt.lower()}", width, height, fmt)
    assert path.stat().st_size < 200
    with pytest.raises(IgradError) as info:
        decode_image(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and "refused before decoding" in text
    assert f"{width}×{height} = {width * height:,} pixels" in text and "64,000,000" in text


def test_the_pixel_limit_is_an_option_checked_at_its_boundary(tmp_path):
    """A real 8×8 image (64 pixels): accepted at max_pixels=64, refused at 63; a bomb under a limit above
    Pillow's own is still refused, naming Pillow's limit."""
    path = tmp_path / "rgb8.png"
    GOOD["rgb8.png"][0](path)
    assert decode_image(path, max_pixels=SIZE * SIZE).shape == (3, SIZE, SIZE)
    with pytest.raises(IgradError, match=r"declares 8×8 = 64 pixels, more than the limit of 63"):
        decode_image(path, max_pixels=SIZE * SIZE - 1)
    with pytest.raises(IgradError, match="max_pixels must be a positive integer"):
        decode_image(path, max_pixels=0)
    bomb = _declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(IgradError, match=r"20000×20000 = 400,000,000 pixels, more than Pillow's decompression-bomb"):
        decode_image(bomb, max_pixels=10**9)


def test_every_way_images_enter_refuses_a_bomb_in_one_line(tmp_path, capsys, no_decoding):
    """An image folder (train, evaluate, reproduce), igrad explain's files and igrad evaluate's --data: one
    line naming the file, no traceback; the options move the limit."""
    folder = tmp_path / "data" / "test" / "a"
    folder.mkdir(parents=True)
    bomb = _declaring(folder / "bomb.png", 20000, 20000)
    with pytest.raises(IgradError, match="bomb.png") as info:
        load_split(tmp_path / "data", "test")
    assert "\n" not in str(info.value)
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    assert main(["explain", "--checkpoint", str(ckpt), str(bomb), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "400,000,000" in err and "Traceback" not in err
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "Traceback" not in err


def test_the_limit_applies_to_cached_folders_and_the_command_line(tmp_path, capsys):
    """A folder decoded under a larger limit is refused from its cache under a smaller one; --max-pixels of
    igrad explain refuses a real image over it."""
    _write(tmp_path / "data" / "test" / "x", ["rgb8.png"], GOOD)
    assert load_split(tmp_path / "data", "test").images.shape == (1, 3, SIZE, SIZE)  # decoded and cached
    with pytest.raises(IgradError, match=r"8×8 = 64 pixels, more than the limit of 10"):
        load_split(tmp_path / "data", "test", max_pixels=10)
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    image = str(tmp_path / "data" / "test" / "x" / "rgb8.png")
    assert main(["explain", "--checkpoint", str(ckpt), image, "--max-pixels", "10", "--out", str(tmp_path / "o")]) == 2
    assert "more than the limit of 10" in capsys.readouterr().err
