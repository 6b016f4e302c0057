"""The work every measurement of the benchmark does: one question, one chart image, greedy sampling.

Why one module: qvq-local's path, the raw libraries' paths, the language-lock figure and the ``--samples``
chains must all ask the same question about the same image with the same sampling, or their figures are
not comparable; each used to reach for these in another measuring module.  Also here: loading the
measured model through the API (the one call every qvq-side job makes) and counting the loaded model's
tokens.  Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path

from qvq_local import atomic

QUESTION = "What is the largest value in this chart? Think it through, then give the number."


def greedy_sampling() -> dict:
    """Greedy decoding with QVQ's repetition penalty: the same work on the qvq and raw paths."""
    return {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.05, "seed": 0}


def make_image(size: int, path: Path) -> Path:
    """A deterministic ``size`` x ``size`` bar-and-line chart PNG (the same bytes every run)."""
    from PIL import Image, ImageDraw

    if path.is_file():
        return path
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    s = size / 224.0
    base = int(200 * s)
    for i, h in enumerate([40, 90, 60, 120, 75]):
        x = int((20 + i * 40) * s)
        draw.rectangle([x, base - int(h * s), x + int(24 * s), base], fill=(40 + 40 * i, 90, 200 - 30 * i))
    draw.line([(int(10 * s), base), (int(214 * s), base)], fill="black", width=max(1, int(2 * s)))
    points = [(int(x * s), int(y * s)) for x, y in [(20, 150), (60, 110), (100, 130), (140, 80), (180, 120)]]
    draw.line(points, fill="red", width=max(1, int(3 * s)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        img.save(tmp)
    return path


def make_clip(path: Path, seconds: int = 10, size: tuple[int, int] = (640, 360), fps: int = 25) -> Path:
    """A deterministic clip for ``qvq bench --video``: ``seconds`` of a square crossing a bar chart,
    MPEG-4 at ``fps`` with a keyframe a second (PyAV; written once, atomically)."""
    from fractions import Fraction

    if path.is_file():
        return path
    import av
    import numpy as np

    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path, suffix=".mp4") as tmp:
        container = av.open(str(tmp), "w", format="mp4")
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.time_base = Fraction(1, fps)
        for i in range(seconds * fps):
            frame = np.full((h, w, 3), 255, np.uint8)
            for b, bar in enumerate((0.3, 0.6, 0.45, 0.8, 0.55)):
                x = int(w * (0.1 + 0.16 * b))
                frame[int(h * (1 - bar)) : h - 10, x : x + w // 10] = (40 + 40 * b, 90, 200 - 30 * b)
            x = int((w - 40) * i / (seconds * fps))
            frame[h // 4 : h // 4 + 40, x : x + 40] = (220, 30, 30)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
    return path


def load_model(spec: dict):
    """The measured model of a worker job, through the API as a user loads it (``spec``: model, backend and
    the backend's load options, checked by the harness)."""
    from qvq_local.api import load

    return load(spec["model"], backend=spec["backend"], **(spec.get("options") or {}))


def count_tokens(loaded, text: str, *, special: bool = False) -> int | None:
    """Tokens in ``text`` by the loaded model's own tokenizer (``special``: control tokens written in the
    text count as one token each); None when its backend has no ``tokenizer`` capability (registry)."""
    from qvq_local.backends import registry

    if not registry.get(loaded.backend).has(registry.TOKENIZER):
        return None
    return len(loaded.tokenize(text, special=special))
