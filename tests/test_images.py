"""Image loading: every bad input gives one clear InputError naming the file; odd formats become sane RGB."""

from __future__ import annotations

import re
import struct
import zlib

import pytest
from helpers import assert_error, assert_upright, oriented_pair
from PIL import Image

from qvq_local.errors import InputError
from qvq_local.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    FACTOR,
    bound_size,
    image_tokens,
    load_image,
)


def noise(w, h, mode="RGB", seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(arr, mode=mode)


def png_bytes(width, height, idat=b""):
    """A hand-made PNG: a valid header claiming ``width`` x ``height``, with whatever pixel data is given."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_clear_error(path, *words):
    """load_image(path) raises one InputError line naming ``path`` and saying ``words`` outside the path."""
    with pytest.raises(InputError) as info:
        load_image(path)
    return assert_error(info, *(re.escape(w) for w in words), path=path)


# ---------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert_clear_error(tmp_path / "nope.png", "no such image file")


def test_directory(tmp_path):
    assert_clear_error(tmp_path, "folder")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_clear_error(path, "empty file (0 bytes)")


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture\n" * 20)
    assert_clear_error(path, "not an image", "looks like a text file")


def test_pdf_renamed_to_png(tmp_path):
    path = tmp_path / "doc.png"
    path.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")
    assert_clear_error(path, "PDF")


def test_random_binary_with_image_extension(tmp_path):
    path = tmp_path / "blob.jpg"
    path.write_bytes(bytes(range(256)) * 8)
    assert_clear_error(path, "not an image")


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path, fmt, suffix):
    path = tmp_path / f"cut.{suffix}"
    noise(320, 240).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_clear_error(path, "truncated or corrupt")


def test_corrupt_png_header(tmp_path):
    path = tmp_path / "bad.png"
    good = png_bytes(10, 10)
    path.write_bytes(good[:16] + b"\xff" * 20)  # signature + broken IHDR
    assert_clear_error(path, "PNG")


def test_zero_size_png(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes(0, 10, zlib.compress(b"\0")))
    assert_clear_error(path, "zero size")


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    # a tiny file whose header claims 30000 x 30000 pixels (900 megapixels)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(30000, 30000, zlib.compress(b"\0" * 1000)))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    assert_clear_error(path, "too large", "decompression bomb")


def test_source_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(5000, 4000, zlib.compress(b"\0" * 1000)))  # 20 MP, below Pillow's limits
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(InputError) as raised:
        load_image(path, max_source_pixels=10_000_000)
    assert_error(raised, "too large.*5000x4000")


# ------------------------------------------------------------------------------------- odd formats


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_picture_upright(tmp_path, orientation, fmt):
    """Each EXIF orientation (2-8, and 1 as the control) in each format that carries EXIF comes out the
    way a viewer shows it: an asymmetric picture (four grey quadrants) is checked quadrant by quadrant."""
    upright, stored = oriented_pair(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented.{fmt.lower()}"
    stored.save(path, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    out, info = load_image(path, max_pixels=10**6)
    assert info.original_size == (upright.shape[1], upright.shape[0])
    assert_upright(out, upright)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_rotated_tiff_fallback_turns_the_picture_upright(tmp_path, monkeypatch, orientation):
    """The fallback transposes (for a Pillow whose orientation step leaves a rotated TIFF as stored) give
    the same picture as Pillow's own step.  Here Pillow's step is switched off so the fallback runs."""
    import PIL.ImageOps

    monkeypatch.setattr(PIL.ImageOps, "exif_transpose", lambda im, **_: im)
    upright, stored = oriented_pair(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "scan.tiff"
    stored.save(path, "TIFF", exif=exif.tobytes())
    out, info = load_image(path, max_pixels=10**6)
    assert info.original_size == (upright.shape[1], upright.shape[0])
    assert_upright(out, upright)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(path, "JPEG")  # pure cyan
    out, _ = load_image(path)
    r, g, b = out.getpixel((10, 10))
    assert out.mode == "RGB" and r < 40 and g > 200 and b > 200


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    import numpy as np

    arr = np.zeros((64, 64), dtype=np.uint16)
    arr[:, :32] = 32768  # left half mid-grey in 16 bits
    Image.fromarray(arr).save(path, "PNG")
    assert Image.open(path).mode == "I;16"
    out, _ = load_image(path)
    assert out.mode == "RGB"
    assert 120 <= out.getpixel((5, 30))[0] <= 135  # 32768/65535 of white, not clipped to 255
    assert out.getpixel((out.size[0] - 3, 30)) == (0, 0, 0)


def test_palette_with_transparency_goes_on_white(tmp_path):
    path = tmp_path / "pal.png"
    img = Image.new("P", (60, 60), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (30, 0, 60, 60))  # right half red, left half index 0 (transparent)
    img.save(path, "PNG", transparency=0)
    out, _ = load_image(path)
    assert out.getpixel((5, 30)) == (255, 255, 255)
    assert out.getpixel((55, 30))[0] > 240 and out.getpixel((55, 30))[1] < 20


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    img = Image.new("RGBA", (60, 60), (255, 0, 0, 0))  # transparent
    img.paste((255, 0, 0, 255), (30, 0, 60, 60))  # opaque red right half
    img.save(path)
    out, _ = load_image(path)
    assert out.getpixel((5, 30)) == (255, 255, 255)
    assert out.getpixel((55, 30)) == (255, 0, 0)


def test_la_image(tmp_path):
    path = tmp_path / "la.png"
    img = Image.new("LA", (56, 56), (0, 128))  # half-transparent black
    img.save(path)
    out, _ = load_image(path)
    assert 120 <= out.getpixel((10, 10))[0] <= 135  # black at 50% over white


def test_animated_gif_uses_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (56, 56), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    out, info = load_image(path)
    r, g, b = out.getpixel((20, 20))
    assert r > 240 and g < 20 and b < 20 and info.size == (56, 56)


def test_one_pixel_image_is_upscaled_to_the_minimum(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    out, info = load_image(path)
    assert info.original_size == (1, 1)
    assert out.size == info.size and out.size[0] * out.size[1] >= DEFAULT_MIN_PIXELS
    assert out.size[0] % FACTOR == 0 and out.size[1] % FACTOR == 0
    assert out.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("size", [(10000, 50), (50, 10000)])
def test_very_wide_strip_is_bounded_and_keeps_its_aspect(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 100, 0)).save(path)
    out, info = load_image(path)
    w, h = info.size
    assert out.size == (w, h) and w * h <= DEFAULT_MAX_PIXELS
    assert w % FACTOR == 0 and h % FACTOR == 0
    assert max(w, h) / min(w, h) == pytest.approx(200, rel=0.05)  # 10000/50, kept
    assert info.tokens == image_tokens(w, h) == (w // 28) * (h // 28)


def test_large_photo_is_bounded(tmp_path):
    path = tmp_path / "photo.jpg"
    noise(1600, 1200).save(path, "JPEG")
    _out, info = load_image(path)
    w, h = info.size
    assert info.original_size == (1600, 1200)
    assert w * h <= DEFAULT_MAX_PIXELS and w % 28 == 0 and h % 28 == 0
    assert w / h == pytest.approx(4 / 3, rel=0.1)
    assert info.tokens <= 256


@pytest.mark.parametrize(
    ("max_pixels", "square", "landscape"),
    [
        (112 * 112, (112, 112), (140, 84)),  # lower than the default
        (DEFAULT_MAX_PIXELS, (448, 448), (560, 336)),
        (896 * 896, (896, 896), (1008, 588)),  # higher than the default
    ],
)
def test_max_pixels_is_honoured_both_ways(tmp_path, max_pixels, square, landscape):
    """The bound is the one asked for, not the default: sizes worked out by hand with Qwen2-VL's rule."""
    for size, expected in (((1000, 1000), square), ((1000, 600), landscape)):
        path = tmp_path / f"photo-{size[0]}x{size[1]}.png"
        noise(*size).save(path)
        out, info = load_image(path, max_pixels=max_pixels)
        assert info.original_size == size
        assert out.size == info.size == expected
        assert info.tokens == (expected[0] // 28) * (expected[1] // 28)
        assert expected[0] * expected[1] <= max_pixels


def test_sample_image_fixture_loads(sample_image):
    out, info = load_image(sample_image)
    assert out.mode == "RGB" and info.size == (224, 168) and info.tokens == 8 * 6


# ------------------------------------------------------------------------------------------ sizing


@pytest.mark.parametrize(
    "w, h",
    [
        (448, 448),
        (1920, 1080),
        (1080, 1920),
        (1, 1),
        (10000, 50),
        (50, 10000),
        (100000, 10),
        (3, 7),
        (4032, 3024),
        (28, 28),
        (29, 1000),
    ],
)
def test_bound_size_rules(w, h):
    bw, bh = bound_size(w, h)
    assert bw % FACTOR == 0 and bh % FACTOR == 0 and bw >= FACTOR and bh >= FACTOR
    assert bw * bh <= DEFAULT_MAX_PIXELS
    if max(w, h) / min(w, h) < 50:  # ordinary shapes also meet the minimum and keep their aspect
        assert bw * bh >= DEFAULT_MIN_PIXELS
        assert (bw / bh) == pytest.approx(w / h, rel=0.25)


def test_bound_size_matches_smart_resize_for_ordinary_images():
    # values from Qwen2-VL's smart_resize rule (round to 28, scale down by sqrt of the pixel ratio)
    assert bound_size(448, 448) == (448, 448)
    assert bound_size(224, 168) == (224, 168)
    assert bound_size(1000, 1000, max_pixels=1_003_520) == (980, 980)  # 1008^2 is over, so floor


def test_bound_size_extreme_aspect_is_clamped_not_refused():
    assert bound_size(10000, 50) == (5600, 28)
    assert bound_size(100000, 10) == (DEFAULT_MAX_PIXELS // 28 // 28 * 28, 28)


def test_bound_size_rejects_impossible_bounds():
    with pytest.raises(InputError) as raised:
        bound_size(100, 100, max_pixels=100)
    assert_error(raised, "max pixels")
    with pytest.raises(InputError):
        bound_size(0, 100)


def test_image_tokens():
    assert image_tokens(448, 448) == 256
    assert image_tokens(56, 28) == 2
