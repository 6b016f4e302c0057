"""A clip in the panel header, the plain header, --json and --save transcripts."""

from __future__ import annotations

import io
import json

from rich.console import Console
from test_render import _events

from qvq_local.events import ClipInfo, Finished, Started
from qvq_local.openai_format import completion_dict
from qvq_local.render import JsonRenderer, LiveRenderer, PlainRenderer
from qvq_local.transcript import render_transcript

CLIP = ClipInfo(
    path="/videos/ball.mp4",
    duration_s=12.0,
    timestamps=[0.0, 1.5, 3.0, 4.5, 6.0, 7.5, 9.0, 10.5],
    source_size=(1920, 1080),
    frame_size=(448, 252),
    tokens=576,
    mode="video",
    decode_s=0.42,
    notes=["turned 90° clockwise as its display matrix says"],
)


def _with_clip(clip: ClipInfo):
    events = _events()
    for event in events:
        if isinstance(event, Started):
            event.images, event.clip = [], clip
        if isinstance(event, Finished):
            event.result.images, event.result.clip = [], clip
    return events


def test_headers_show_the_clip():
    console = Console(record=True, force_terminal=True, width=160, height=30)
    with LiveRenderer(console) as renderer:
        for event in _with_clip(CLIP):
            renderer.handle(event)
    live = console.export_text()
    assert "ball.mp4 (12.0s, 8 frames, 448×252, 576 video tokens, decoded in 420ms)" in live
    out, err = io.StringIO(), io.StringIO()
    PlainRenderer(out, err).run(_with_clip(CLIP))
    assert "ball.mp4 (12.0s, 8 frames, 448×252, 576 video tokens" in err.getvalue()
    frames = ClipInfo(**{**CLIP.__dict__, "mode": "frames", "tokens": 1152})
    out, err = io.StringIO(), io.StringIO()
    PlainRenderer(out, err).run(_with_clip(frames))
    assert "video as 8 frames" in err.getvalue() and "1152 image tokens" in err.getvalue()


def test_json_records_the_sampled_timestamps():
    buf = io.StringIO()
    JsonRenderer(buf).run(_with_clip(CLIP))
    data = json.loads(buf.getvalue())
    clip = data["qvq"]["clip"]
    assert clip["timestamps"] == CLIP.timestamps and clip["frames"] == 8 and clip["mode"] == "video"
    assert clip["frame_size"] == [448, 252] and clip["tokens"] == 576 and clip["duration_s"] == 12.0
    plain = completion_dict(_events()[-1].result)
    assert "clip" not in plain["qvq"]  # no clip: the same object as before
    assert "clip" not in _events()[-1].result.to_dict()


def test_transcript_names_the_timestamps():
    result = _with_clip(CLIP)[-1].result
    text = render_transcript(result, "What happens after the ball hits the fan?")
    assert "## Clip" in text and "`/videos/ball.mp4`: 12.0 s, 1920×1080; 8 frames at 448×252 as video" in text
    assert "sampled at (seconds): 0.00, 1.50, 3.00, 4.50, 6.00, 7.50, 9.00, 10.50" in text
    assert "turned 90° clockwise" in text
    assert "- (none)" not in text
