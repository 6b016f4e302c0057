"""qvq serve's clips: the request forms vLLM and DashScope document, their limits (413 before any frame is
decoded), and the clip a request's video part becomes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("av")

import clips

from qvq_local import video
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.serve import media
from qvq_local.serve.schema import ApiError, VideoRef, parse_chat_request
from qvq_local.video import VideoOptions

PARTS = json.loads((Path(__file__).parent / "data" / "remote" / "video_parts.json").read_text())
SMALL = VideoOptions(min_pixels=28 * 28 * 4, video_tokens=100_000)


def _body(*parts) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}]}


def _data_uri(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_documented_forms_parse():
    req = parse_chat_request(_body(PARTS["vllm_video_url"]))
    assert req.videos == [
        VideoRef(urls=["https://example.com/clip.mp4"], is_file=True, where="messages[0].content[0]")
    ]
    assert req.images == [] and req.question == "What happens?"
    req = parse_chat_request(_body(PARTS["dashscope_video_url"]))
    assert req.videos[0].fps == 2.0 and req.videos[0].is_file
    req = parse_chat_request(_body(PARTS["dashscope_image_list"]))
    assert not req.videos[0].is_file and len(req.videos[0].urls) == 4


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ({"type": "video_url", "video_url": {"url": ""}}, "video_url.url must be a non-empty string"),
        ({"type": "video", "video": []}, "non-empty list of frame URLs"),
        ({"type": "video", "video": [1, 2]}, "non-empty list of frame URLs"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}, "fps": 0}, "fps must be"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}, "fps": True}, "fps must be"),
        ({"type": "audio_url", "audio_url": {"url": "x"}}, "video_url and video are supported"),
    ],
)
def test_bad_parts_are_400(part, words):
    with pytest.raises(ApiError) as info:
        parse_chat_request(_body(part))
    assert info.value.status == 400 and words in info.value.message


def test_videos_in_a_system_message_are_400():
    body = {
        "messages": [
            {"role": "system", "content": [PARTS["vllm_video_url"]]},
            {"role": "user", "content": "q"},
        ]
    }
    with pytest.raises(ApiError, match="videos belong in the user message"):
        parse_chat_request(body)


def test_counts_are_413_before_anything_is_read():
    limits = media.Limits()
    two = [VideoRef(urls=["x"], is_file=True, where=f"p{i}") for i in range(2)]
    with pytest.raises(ApiError) as info:
        media.check_videos(two, limits)
    assert info.value.status == 413
    many = [VideoRef(urls=["x"] * 65, is_file=False, where="p")]
    with pytest.raises(ApiError) as info:
        media.check_videos(many, limits)
    assert info.value.status == 413 and "65 frames" in info.value.message
    media.check_videos([VideoRef(urls=["x"] * 64, is_file=False, where="p")], limits)


def test_a_data_uri_clip_becomes_its_sampled_frames(tmp_path):
    path = clips.write_clip(tmp_path / "c.mp4", frames=40, fps=10)
    ref = VideoRef(urls=[_data_uri(path)], is_file=True, where="messages[0].content[0]", fps=1.0)
    budget = media.DecodeBudget(64 * 2**20)
    clip = media.load_clip(ref, media.Limits(), SMALL, family=DEFAULT_FAMILY, budget=budget)
    assert [clips.frame_number(f) for f in clip.frames] == [0, 13, 26, 39]  # 1 a second, at least 4
    assert clip.path == "messages[0].content[0]" and budget.used == 0 and budget.peak > 0


def test_a_frame_list_becomes_a_clip(tmp_path):
    from PIL import Image

    uris = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(clips.numbered_frame(i)).save(buf, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    ref = VideoRef(urls=uris, is_file=False, where="messages[0].content[0]", fps=2.0)
    clip = media.load_clip(ref, media.Limits(), SMALL, family=DEFAULT_FAMILY)
    assert [clips.frame_number(f) for f in clip.frames] == list(range(6))
    assert clip.timestamps == pytest.approx([i / 2 for i in range(6)]) and clip.kind == "frames"


def test_limits_answer_413_before_any_frame_is_decoded(tmp_path, monkeypatch):
    decoded = []
    monkeypatch.setattr(video._FrameReader, "frame_at", lambda self, t: decoded.append(t))
    long = clips.write_clip(tmp_path / "long.mp4", frames=40, fps=10)
    ref = VideoRef(urls=[_data_uri(long)], is_file=True, where="p")
    for limits, words in (
        (media.Limits(max_video_seconds=2), "over the 2 s limit"),
        (media.Limits(max_image_pixels=100), "limit 100"),
        (media.Limits(max_video_bytes=100), "video is over 100 bytes"),
    ):
        with pytest.raises(ApiError) as info:
            media.load_clip(ref, limits, SMALL, family=DEFAULT_FAMILY)
        assert info.value.status == 413 and words in info.value.message, words
    huge = clips.write_huge_gif(tmp_path / "huge.gif")
    with pytest.raises(ApiError) as info:
        media.load_clip(
            VideoRef(urls=[_data_uri(huge, "image/gif")], is_file=True, where="p"),
            media.Limits(),
            SMALL,
            family=DEFAULT_FAMILY,
        )
    assert info.value.status == 413
    assert decoded == []


def test_bad_clips_are_400_and_urls_follow_the_image_policy(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(range(256)) * 4)
    audio = clips.write_audio_only(tmp_path / "a.m4a")
    for path, words in ((noise, "not a readable video"), (audio, "has no video stream")):
        with pytest.raises(ApiError) as info:
            media.load_clip(
                VideoRef(urls=[_data_uri(path)], is_file=True, where="p"),
                media.Limits(),
                SMALL,
                family=DEFAULT_FAMILY,
            )
        assert info.value.status == 400 and info.value.code == "invalid_video" and words in info.value.message
    for url, words in (
        ("https://example.com/c.mp4", "video URLs are off"),
        ("file:///etc/passwd", "not file"),
    ):
        with pytest.raises(ApiError) as info:
            media.load_clip(
                VideoRef(urls=[url], is_file=True, where="p"), media.Limits(), SMALL, family=DEFAULT_FAMILY
            )
        assert info.value.status == 400 and words in info.value.message
