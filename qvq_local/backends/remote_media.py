"""A clip as an OpenAI-compatible server takes it, in the form each kind of server documents.

qvq samples the clip itself (``qvq_local.video``), so the server sees the frames the header names:

* QVQ-Max (Alibaba Model Studio) and ``qvq serve``: DashScope's image-list form, the sampled frames as PNG
  data URIs with the rate they were sampled at: ``{"type": "video", "video": [...], "fps": 2.0}``;
* vLLM and other OpenAI-compatible servers: vLLM's ``{"type": "video_url", "video_url": {"url":
  "data:video/mp4;base64,..."}}``, the sampled frames written as a short MP4 whose frames keep their own
  times (the server samples it again at its own rate: at qvq's rate or below it gets these frames);
* llama.cpp's server (mtmd has no video input): the frames as images, each with its time written before
  it, as the llama.cpp backend sends them.

Mechanism only: builds content parts, sends nothing.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from typing import Any


def png_data_uri(image: Any) -> str:
    """An RGB image as a PNG ``data:`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def clip_mp4(clip: Any) -> bytes:
    """The clip's sampled frames as an MP4 (MPEG-4 part 2, every frame a keyframe), each frame at its own
    time, so a server that decodes and samples it by time finds these frames."""
    import av

    out = io.BytesIO()
    container = av.open(out, "w", format="mp4")
    try:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height = clip.frame_size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size = 1
        stream.codec_context.options = {"qscale": "2"}
        last = -1
        for image, t in zip(clip.frames, clip.timestamps):
            pts = max(last + 1, int(round(t * 1000)))  # strictly increasing, even for repeated frames
            last = pts
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            frame.pts = pts
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return out.getvalue()


def sampled_fps(clip: Any) -> float:
    """Frames a second the clip was sampled at (frames over its length, as DashScope's ``fps`` means)."""
    if clip.duration > 0 and len(clip.frames) > 1:
        return round(len(clip.frames) / clip.duration, 3)
    return 1.0


def clip_parts(clip: Any, kind: str, timestamp: str = "<{seconds:.1f} seconds>") -> list[dict]:
    """The content parts that carry ``clip`` to a server of ``kind`` (see the module docstring)."""
    if kind in ("qvq-max", "qvq"):
        return [
            {
                "type": "video",
                "video": [png_data_uri(image) for image in clip.frames],
                "fps": max(0.1, min(30.0, sampled_fps(clip))),
            }
        ]
    if kind == "llama-server":
        parts: list[dict] = []
        for image, t in zip(clip.frames, clip.timestamps):
            parts.append({"type": "text", "text": timestamp.format(seconds=t)})
            parts.append({"type": "image_url", "image_url": {"url": png_data_uri(image)}})
        return parts
    data = base64.b64encode(clip_mp4(clip)).decode()
    return [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + data}}]
