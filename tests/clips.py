"""Test clips made here with PyAV, each frame carrying its own number so a test can read back exactly which
frames were sampled (nothing is downloaded).

A frame's number is written as :data:`BITS` vertical stripes, white for a 1 bit and black for a 0, most
significant first, across the frame's width; a red block marks the stored frame's top-left corner, so a
test can also tell how a frame was turned.  :func:`frame_number` reads the number back from any frame
(resized, compressed, turned upright) whose stripes run top to bottom.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

BITS = 10  # frame numbers 0..1023


def numbered_frame(index: int, width: int = 160, height: int = 96) -> np.ndarray:
    """An RGB frame (height, width, 3) showing ``index`` as stripes, with a red top-left marker."""
    arr = np.zeros((height, width, 3), np.uint8)
    stripe = width // BITS
    for bit in range(BITS):
        if (index >> (BITS - 1 - bit)) & 1:
            arr[:, bit * stripe : (bit + 1) * stripe] = 255
    mark = max(4, min(width, height) // 6)
    arr[:mark, :mark] = (255, 0, 0)
    return arr


def frame_number(image) -> int:
    """The number :func:`numbered_frame` wrote, read from the middle row band of each stripe."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    band = arr[h // 3 : 2 * h // 3]
    grey = band.mean(axis=2)
    value = 0
    for bit in range(BITS):
        x0 = int((bit + 0.3) * w / BITS)
        x1 = max(x0 + 1, int((bit + 0.7) * w / BITS))
        value = (value << 1) | int(grey[:, x0:x1].mean() > 127)
    return value


def red_corner(image) -> str:
    """Which corner the red marker is in: "tl", "tr", "bl" or "br"."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    k = max(2, min(h, w) // 12)
    corners = {
        "tl": arr[:k, :k],
        "tr": arr[:k, -k:],
        "bl": arr[-k:, :k],
        "br": arr[-k:, -k:],
    }
    redness = {name: float((c[..., 0] - c[..., 1]).mean()) for name, c in corners.items()}
    return max(redness, key=redness.get)


def write_clip(
    path: Path,
    times: list[float] | None = None,
    *,
    frames: int = 20,
    fps: float = 10,
    size: tuple[int, int] = (160, 96),
    codec: str = "mpeg4",
    gop: int = 10,
    rotation: int | None = None,
    audio: bool = False,
) -> Path:
    """Write a clip whose frame ``i`` shows number ``i``.  ``times``: each frame's presentation time in
    seconds (variable frame rate); otherwise ``frames`` frames at ``fps``.  ``rotation``: the display
    matrix, counter-clockwise degrees as PyAV reads it back.  The container follows the suffix."""
    import av

    if times is None:
        times = [i / fps for i in range(frames)]
    container = av.open(str(path), "w")
    stream = container.add_stream(
        codec, rate=int(round(fps)) if fps >= 1 else Fraction(fps).limit_denominator()
    )
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p" if codec not in ("gif", "apng") else ("rgb8" if codec == "gif" else "rgb24")
    stream.codec_context.gop_size = gop
    stream.codec_context.time_base = Fraction(1, 1000)
    stream.time_base = Fraction(1, 1000)
    if codec in ("mpeg4",):
        stream.codec_context.options = {"qscale": "2"}
    if rotation is not None:
        stream.set_display_rotation(rotation)
    if audio:
        a = container.add_stream("aac", rate=16000)
        a.layout = "mono"
    for i, t in enumerate(times):
        frame = av.VideoFrame.from_ndarray(numbered_frame(i, *size), format="rgb24")
        frame.pts = int(round(t * 1000))
        frame.time_base = Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """An AAC-only file (no video stream)."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=16000)
    stream.layout = "mono"
    samples = int(16000 * seconds)
    pcm = (np.sin(np.arange(samples) / 8.0) * 8000).astype(np.int16)[None, :]
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 16000
    frame.pts = 0
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_empty_video(path: Path) -> Path:
    """A container with a video stream and no frames (zero length)."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height = 64, 48
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return path


def write_animated(path: Path, frames: int = 6, size: tuple[int, int] = (80, 48), ms: int = 100) -> Path:
    """An animated GIF or APNG (by suffix) made with Pillow, frame ``i`` showing number ``i``."""
    from PIL import Image

    images = [Image.fromarray(numbered_frame(i, *size)) for i in range(frames)]
    fmt = "GIF" if path.suffix.lower() == ".gif" else "PNG"
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


def write_huge_gif(path: Path, width: int = 9000, height: int = 9000) -> Path:
    """A two-frame GIF whose logical screen is ``width`` x ``height`` while each frame is 1x1 pixel: huge
    in its header, a few bytes on disk."""

    def image_block() -> bytes:
        gce = b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # 100 ms a frame
        desc = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
        data = b"\x02\x02\x44\x01\x00"  # LZW min code 2, one pixel of colour 0
        return gce + desc + data

    header = b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00"
    palette = b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    path.write_bytes(header + palette + loop + image_block() + image_block() + b"\x3b")
    return path
