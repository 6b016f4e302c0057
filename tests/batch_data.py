"""Images for the batch tests: good ones of several formats and sizes, and every kind of bad one."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path


def png_bytes(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header says ``width`` x ``height`` (with correct CRCs) and whose data is ``idat``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_image(path: Path, seed: int) -> Path:
    """A small picture (a few image tokens, so the tiny model answers fast), its size and colours from
    ``seed``; the format from the suffix."""
    from PIL import Image, ImageDraw

    w, h = 56 + 28 * (seed % 3), 56 + 28 * ((seed // 3) % 2)
    img = Image.new("RGB", (w, h), (255 - 5 * seed % 255, 40 + 3 * seed % 200, 90))
    ImageDraw.Draw(img).rectangle([4, 4, 4 + seed % 40, 30], fill=(seed * 7 % 255, 20, 200))
    img.save(path)
    return path


#: name -> what makes it bad (the words its error row must hold)
BAD = {
    "empty.png": "empty file",
    "text.png": "text file",
    "document.png": "PDF",
    "noise.jpg": "not an image",
    "truncated.png": "truncated or corrupt",
    "zero.png": "zero size",
    "bomb.png": "too large",
    "broken-header.png": "corrupt header",
    "truncated.jpg": "truncated or corrupt",
}


def _noise(width: int, height: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def bad_image(path: Path) -> Path:
    name = path.name
    if name == "empty.png":
        path.write_bytes(b"")
    elif name == "text.png":
        path.write_text("this is not a picture\n" * 20)
    elif name == "document.png":
        path.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 4)
    elif name == "noise.jpg":
        path.write_bytes(bytes((i * 97 + 13) % 251 for i in range(3000)))
    elif name in ("truncated.png", "truncated.jpg"):
        data = io.BytesIO()
        _noise(160, 120).save(data, "PNG" if name.endswith(".png") else "JPEG")
        path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    elif name == "zero.png":
        path.write_bytes(png_bytes(0, 10, zlib.compress(b"\0")))
    elif name == "bomb.png":  # a header claiming 30000 x 30000 pixels
        path.write_bytes(png_bytes(30000, 30000, zlib.compress(b"\0" * 1000)))
    elif name == "broken-header.png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    else:
        raise ValueError(name)
    return path


def mixed_folder(folder: Path, good: int = 41) -> tuple[list[str], list[str]]:
    """``good`` good images and every bad kind in ``folder`` (50 files with the defaults); returns the names
    of each kind, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    suffixes = (".png", ".jpg", ".webp", ".bmp", ".gif")
    goods = [good_image(folder / f"img{i:02d}{suffixes[i % len(suffixes)]}", i).name for i in range(good)]
    bads = [bad_image(folder / name).name for name in BAD]
    return sorted(goods), sorted(bads)


def jsonl_list(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
