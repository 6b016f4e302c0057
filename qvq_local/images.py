"""Load, validate and bound images before they reach a vision encoder, and prepare them for a prompt.

Every image goes through :func:`load_image`: it names the file and the problem in one line for anything it
cannot use (missing, a folder, empty, not an image, truncated, a decompression bomb, zero-size), turns
whatever it gets into plain RGB the way a person would expect to see it, and bounds its pixel count.

Why bound the pixels: the Qwen2-VL vision tower costs grows faster than linearly with image size (a 448x448
image, 256 image tokens, took 8.5 s to encode on 2 CPU cores; 896x896 took 60 s), and the image tokens
take context.  How many pixels a question's images keep is its detail level (:mod:`qvq_local.detail`:
low, medium, high, max, by default chosen from the machine that encodes them) or a pixel bound
(``--max-pixels``); ``DEFAULT_MAX_PIXELS``, the low level on QVQ's grid (448x448, at most 256 image
tokens), is the bound where neither a model nor a level is known.

Conversions, in order:

* EXIF orientation is applied first (phone photos come out upright; sizes are reported after it).
* Only the first frame of an animated GIF/PNG/WebP or a multi-page TIFF is used.
* Transparency (RGBA, LA, palette with a transparent colour) is composited on white, as viewers show it.
* 16-bit and 32-bit greyscale (``I;16``, ``I``) are scaled to 8 bits (Pillow's own conversion clips every
  value above 255 to white); float images (``F``) are taken as 0..1 when they fit, clipped otherwise.
* CMYK, YCbCr, LAB, HSV and 1-bit images use Pillow's conversion to RGB.

Sizing (:func:`bound_size`) follows Qwen2-VL's ``smart_resize``: both sides multiples of 28 (a 14-pixel
patch, merged 2x2), the aspect ratio kept, the pixel count within ``[min_pixels, max_pixels]``.  Unlike
``smart_resize``, which raises for aspect ratios above 200, extreme strips are clamped instead: the short
side never drops below 28, the long side never exceeds ``max_pixels // 28``, and within those limits the
aspect ratio is kept (a 10000x50 strip becomes 5600x28; 100000x10 becomes 7168x28).

For a question: :func:`prepare_images` turns paths into :class:`PreparedImage` (the image and its
:class:`~qvq_local.events.ImageInfo`) bounded on the grid of the model's family; ``qvq ask`` first reads and
checks each file at its own size (:func:`read_images`, so a bad file fails before a model loads) and
bounds it once the model, and so its family's grid, is known.
"""

from __future__ import annotations

import codecs
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvq_local import detail
from qvq_local.errors import InputError
from qvq_local.events import ImageInfo
from qvq_local.families import DEFAULT_FAMILY

FACTOR = DEFAULT_FAMILY.image_factor
"""Side of one image token in pixels (Qwen2-VL: 14-pixel patches merged 2x2); sides are multiples of it."""

DEFAULT_MAX_PIXELS = detail.max_pixels("low", DEFAULT_FAMILY)  # 448x448, 200,704 pixels: <= 256 image tokens
DEFAULT_MIN_PIXELS = detail.min_pixels(DEFAULT_FAMILY)  # the processor's minimum (4 image tokens)
MAX_SOURCE_PIXELS = 178_956_970
"""Largest source image decoded at all (Pillow's own hard limit, ~179 megapixels, ~540 MB as RGB).
Anything larger is refused from its header, before any pixel is decoded."""


image_tokens = DEFAULT_FAMILY.image_tokens
"""Image tokens the model sees for an image already bounded to ``width`` x ``height``."""


def bound_size(
    width: int,
    height: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    factor: int = FACTOR,
) -> tuple[int, int]:
    """The ``(width, height)`` an image is resized to: multiples of ``factor``, aspect kept, pixels bounded.

    See the module docstring for the rule on extreme aspect ratios (clamped, never an error).
    """
    if width < 1 or height < 1:
        raise InputError(f"image size must be positive, got {width}x{height}")
    if factor < 1:
        raise InputError(f"resize factor must be positive, got {factor}")
    if max_pixels < factor * factor:
        raise InputError(
            f"max pixels must be at least {factor * factor} ({factor}x{factor}), got {max_pixels}"
        )
    min_pixels = max(1, min(min_pixels, max_pixels))
    w, h = DEFAULT_FAMILY.smart_resize(
        width, height, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor
    )

    longest = max(factor, (max_pixels // factor) // factor * factor)
    if h == factor and width > height:
        # the short side hit the floor: give the long side the source's aspect ratio, within the bound
        w = min(longest, max(factor, round(width / height) * factor))
    elif w == factor and height > width:
        h = min(longest, max(factor, round(height / width) * factor))
    # stay within max_pixels whatever rounding did
    while w * h > max_pixels and (w > factor or h > factor):
        if w >= h:
            w -= factor
        else:
            h -= factor
    return w, h


# ------------------------------------------------------------------------------------------ loading


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(head: bytes) -> str:
    """A hint about what a file that Pillow does not recognise actually is."""
    import struct

    stripped = head.lstrip()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        if width == 0 or height == 0:
            return f"image has zero size ({width}x{height} in its PNG header)"
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        if width == 0 or height == 0:
            return f"image has zero size ({width}x{height} in its GIF header)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "not a readable image: a WebP file with a corrupt header"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return f"not a readable image: a {fmt} file with a corrupt header"
    if head.startswith(b"%PDF"):
        return "not an image: it is a PDF (export the page as PNG)"
    if stripped[:5].lower() in (b"<?xml", b"<svg ") or b"<svg" in head[:512].lower():
        return "not an image: it looks like SVG, which is not supported (convert it to PNG)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif"):
        return "HEIC/AVIF images are not supported by this Pillow build (convert it to JPEG or PNG)"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        return "not an image: it looks like a text file"
    return "not an image: the format is not recognised"


def _to_rgb(im):
    """Any Pillow image -> RGB, the way a viewer would show it (see the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
            if arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
        else:
            arr = arr.astype(np.float64) / 257.0  # 65535 -> 255; 32-bit "I" images hold 16-bit data
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in im.info)
        or (mode in ("L", "RGB", "1") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_bytes(width: int, height: int, mode: str, transparency: bool = False) -> int:
    """The memory :func:`load_image` holds at its peak for a ``width`` x ``height`` source in Pillow's
    ``mode`` (read from the header, before decoding): what a server budgets for before it decodes.

    Bytes per source pixel, measured with Pillow 13 (ru_maxrss): 8-bit colour ~12 (the decoded frame at
    Pillow's 4 bytes a pixel, its upright copy, the RGB copy), greyscale and palette ~6, anything with
    transparency ~24 (composited on white, see :func:`_to_rgb`), 16/32-bit greyscale and float ~32 (the
    scaling goes through float64 arrays).
    """
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        per_pixel = 32
    elif transparency or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        per_pixel = 24
    elif mode in ("1", "L", "P"):
        per_pixel = 6
    else:
        per_pixel = 12
    return width * height * per_pixel


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _swapping_transpose(orientation: int):
    """The Pillow transpose that makes an image with EXIF ``orientation`` 5..8 upright."""
    from PIL import Image

    t = Image.Transpose
    return {5: t.TRANSPOSE, 6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}[orientation]


def _orientation(im) -> int:
    """The EXIF orientation (tag 0x0112) as declared in the header, read before decoding (Pillow's TIFF
    loader drops the tag while loading); 1 when absent or unreadable."""
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the picture
        return 1


def _fix_rotated_tiff_size(im, orientation: int) -> bool:
    """Work around Pillow 13's TIFF loader for orientations 5..8.

    Its header parser already reports the rotated (upright) size, but then decodes the stored,
    unrotated strips into a buffer of that rotated size, which scrambles the pixels of single-band and
    RGBA images (a scanner's greyscale TIFF).  Giving the image back its stored size before ``load()``
    lets the decoder fill the buffer correctly; Pillow's own orientation step then rotates it upright.
    Does nothing where the sizes already agree (other formats, a Pillow without the quirk).  Returns
    whether it applied, i.e. whether the header's size is the upright size the result must have.
    """
    stored = getattr(im, "_tile_size", None)
    if (
        im.format == "TIFF"
        and orientation in _SWAPPING_ORIENTATIONS
        and isinstance(stored, tuple)
        and len(stored) == 2
        and tuple(stored) == (im.size[1], im.size[0])
        and tuple(stored) != im.size
        and hasattr(im, "_size")
    ):
        im._size = tuple(stored)
        return True
    return False


def _decode(p: Path, name: str, head: bytes, limit: int):
    """Open (header only), check the size, then decode the first frame and make it upright RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(p)
    except Image.DecompressionBombError:
        raise InputError(
            f"image is too large to decode safely (over {limit:,} pixels; possible decompression bomb)",
            path=name,
        ) from None
    except UnidentifiedImageError:
        raise InputError(_sniff(head), path=name) from None
    except Exception as err:  # noqa: BLE001 - untrusted bytes make Pillow raise anything
        raise InputError(f"not a readable image ({_reason(err)})", path=name) from None

    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InputError(f"image has zero size ({width}x{height})", path=name)
        if width * height > limit:
            raise InputError(
                f"image is too large to decode safely ({width}x{height} = {width * height:,} pixels, "
                f"limit {limit:,}; possible decompression bomb)",
                path=name,
            )
        fmt = im.format or "image"
        orientation = _orientation(im)
        try:
            im.seek(0)  # first frame of an animation or the first page
            fixed = _fix_rotated_tiff_size(im, orientation)
            im.load()
        except Exception as err:  # noqa: BLE001
            raise InputError(f"{fmt} data is truncated or corrupt ({_reason(err)})", path=name) from None
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the picture
            upright = im
        if upright is None:
            upright = im
        if fixed and upright.size != (width, height):
            # the header's upright size was not reached: this Pillow's loader did not rotate after all
            upright = upright.transpose(_swapping_transpose(orientation))
        try:
            rgb = _to_rgb(upright)
        except Exception as err:  # noqa: BLE001
            raise InputError(f"cannot convert {fmt} ({im.mode}) to RGB ({_reason(err)})", path=name) from None

    return rgb


def load_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    *,
    max_source_pixels: int = MAX_SOURCE_PIXELS,
    factor: int = FACTOR,
):
    """Open ``path`` and return ``(PIL.Image in RGB, ImageInfo)``, resized by :func:`bound_size`.

    ``factor``: the side of one image token of the model's family (default Qwen2-VL's 28; Qwen3-VL's 32).

    Raises InputError (one line, naming the file) for anything that is not a usable image.  Pixels are
    decoded only after the header passed the size checks, so a decompression bomb costs nothing.
    """
    from PIL import Image

    bound_size(1, 1, max_pixels=max_pixels, min_pixels=min_pixels, factor=factor)  # bad options: before I/O
    p = Path(path)
    name = str(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError("no such image file", path=name) from None
    except OSError as err:
        raise InputError(f"cannot read image file ({err.strerror or err})", path=name) from None
    if p.is_dir():
        raise InputError("is a folder, not an image file", path=name)
    if not p.is_file():
        raise InputError("is not a regular file", path=name)
    if st.st_size == 0:
        raise InputError("is an empty file (0 bytes), not an image", path=name)
    limit = (
        min(max_source_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_source_pixels
    )

    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError as err:
        raise InputError(f"cannot read image file ({err.strerror or err})", path=name) from None

    # Pillow warns about odd files (bombs below its hard limit, bad TIFF tags, truncated reads); the
    # checks here decide, and a user sees one line, not warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = _decode(p, name, head, limit)

    original = rgb.size
    size = bound_size(original[0], original[1], max_pixels=max_pixels, min_pixels=min_pixels, factor=factor)
    if size != original:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb, ImageInfo(path=name, original_size=original, size=size, tokens=image_tokens(*size, factor))


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:160]


# ---------------------------------------------------------------- images for a prompt


@dataclass
class PreparedImage:
    """An image already loaded and bounded (``qvq_local.images.load_image``), ready for a prompt."""

    image: Any  # PIL.Image.Image, RGB
    info: ImageInfo


@dataclass
class SourceImage:
    """An image file read and checked, at its own size (not bounded yet): what ``qvq ask`` holds while
    the model loads, so that a bad file fails before the load and the image is bounded once, on the grid
    of the model's family, by :func:`prepare_images`."""

    image: Any  # PIL.Image.Image, RGB, EXIF orientation applied
    path: str


def read_images(images: Any) -> list[SourceImage]:
    """Read and check each image (a single path is accepted as well as a list) without bounding it.

    Raises ``InputError`` naming the first bad file (missing, not an image, corrupt, empty, too large).
    """
    if isinstance(images, (str, Path)):
        images = [images]
    sources = []
    for item in images:
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path, got {type(item).__name__}")
        image, info = load_image(item, MAX_SOURCE_PIXELS, 1, factor=1)  # 1-pixel grid: kept as it is
        sources.append(SourceImage(image, info.path))
    if not sources:
        raise InputError("no image given: QVQ answers questions about images, pass at least one")
    return sources


def _bound(
    source: SourceImage, max_pixels: int | None, factor: int | None, min_pixels: int | None = None
) -> PreparedImage:
    """``source`` bounded as :func:`qvq_local.images.load_image` bounds a file (same sizes, same filter)."""
    from PIL import Image

    grid = factor or FACTOR
    original = source.image.size
    low = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
    size = bound_size(*original, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, min_pixels=low, factor=grid)
    image = source.image if size == original else source.image.resize(size, Image.Resampling.BICUBIC)
    info = ImageInfo(path=source.path, original_size=original, size=size, tokens=image_tokens(*size, grid))
    return PreparedImage(image, info)


def prepare_images(
    images: Any, max_pixels: int | None = None, factor: int | None = None, min_pixels: int | None = None
) -> list[PreparedImage]:
    """Load, validate and bound each image; a single path is accepted as well as a list, and a
    :class:`SourceImage` (read already) is only bounded.

    ``factor``: the model family's image-token side (None: the default family's), so that an image is
    resized once, to sides the model's processor keeps; ``min_pixels``: the family's minimum (None: the
    default family's; Qwen3-VL's processor scales an image up to 65,536 pixels).

    Raises ``InputError`` naming the first bad file (missing, not an image, corrupt, empty).
    """
    if isinstance(images, (str, Path, PreparedImage, SourceImage)):
        images = [images]
    prepared: list[PreparedImage] = []
    for item in images:
        if isinstance(item, SourceImage):
            prepared.append(_bound(item, max_pixels, factor, min_pixels))
            continue
        if isinstance(item, PreparedImage):
            w, h = item.info.size
            if not factor or (w % factor == 0 and h % factor == 0) or not Path(item.info.path).is_file():
                prepared.append(item)
                continue
            item = item.info.path  # bounded for another family's grid (before the model was known): redo
        if not isinstance(item, (str, Path)):
            raise InputError(f"expected an image path, got {type(item).__name__}")
        kw: dict[str, Any] = {"factor": factor} if factor else {}
        if min_pixels is not None:
            kw["min_pixels"] = min_pixels
        image, info = load_image(item, max_pixels, **kw) if max_pixels else load_image(item, **kw)
        prepared.append(PreparedImage(image, info))
    if not prepared:
        raise InputError("no image given: QVQ answers questions about images, pass at least one")
    return prepared
