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
        ({"type": "text", "text": 5}, "messages[0].content[0].text must be a string"),
        ({"type": "text"}, "messages[0].content[0].text must be a string"),
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


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def served_mlx(tiny_mlx_f32):
    pytest.importorskip("mlx_vlm")
    pytest.importorskip("fastapi")
    from serve_util import ServerThread

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app

    model = load(tiny_mlx_f32, backend="mlx")
    app = create_app(model, ServeOptions(queue=2, limits=media.Limits(max_video_seconds=30)))
    with ServerThread(app) as server:
        server.model, server.app = model, app
        yield server
    app.state.worker.shutdown()
    model.close()


def _post(served, parts, **extra):
    import httpx

    body = {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}],
        "thinking_budget": 8,
        "answer_budget": 4,
        "seed": 1,
        **extra,
    }
    return httpx.post(served.base_url + "/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def ball(tmp_path_factory):
    return clips.write_clip(tmp_path_factory.mktemp("ball") / "ball.mp4", frames=40, fps=10)


@pytest.mark.mlx
def test_serve_answers_a_clip_in_each_documented_form(served_mlx, ball, tmp_path):
    from PIL import Image

    reply = _post(served_mlx, [{"type": "video_url", "video_url": {"url": _data_uri(ball)}, "fps": 1}])
    assert reply.status_code == 200, reply.text
    clip = reply.json()["qvq"]["clip"]
    assert clip["mode"] == "video" and clip["timestamps"] == [0.0, 1.3, 2.6, 3.9]
    frames = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(clips.numbered_frame(i)).save(buf, format="PNG")
        frames.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    reply = _post(served_mlx, [{"type": "video", "video": frames, "fps": 2}])
    assert reply.status_code == 200, reply.text
    assert reply.json()["qvq"]["clip"]["timestamps"] == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.mlx
def test_serve_refuses_clips_over_its_limits_and_bad_ones(served_mlx, ball, tmp_path):
    long = clips.write_clip(tmp_path / "long.mp4", frames=320, fps=10)  # 32 s, over the 30 s limit
    reply = _post(served_mlx, [{"type": "video_url", "video_url": {"url": _data_uri(long)}}])
    assert reply.status_code == 413 and "over the 30 s limit" in reply.json()["error"]["message"]
    reply = _post(served_mlx, [{"type": "video_url", "video_url": {"url": _data_uri(ball)}}] * 2)
    assert reply.status_code == 413
    audio = clips.write_audio_only(tmp_path / "a.m4a")
    reply = _post(served_mlx, [{"type": "video_url", "video_url": {"url": _data_uri(audio)}}])
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_video"


@pytest.mark.mlx
def test_a_full_queue_answers_429_before_the_clip_is_read(served_mlx, ball, monkeypatch):
    from qvq_local.serve.worker import QueueFull

    read = []
    monkeypatch.setattr("qvq_local.serve.app.load_clip", lambda *a, **k: read.append(1))
    monkeypatch.setattr(served_mlx.app.state.worker, "reserve", lambda: (_ for _ in ()).throw(QueueFull()))
    reply = _post(served_mlx, [{"type": "video_url", "video_url": {"url": _data_uri(ball)}}])
    assert reply.status_code == 429 and read == []


@pytest.mark.mlx
def test_the_remote_backend_carries_a_clip_to_qvq_serve(served_mlx, ball):
    """qvq's openai backend sends the sampled frames in DashScope's frame-list form to qvq serve, which
    answers about them; the local result names the clip as sampled here."""
    from qvq_local.api import load

    with load(None, backend="openai", base_url=served_mlx.base_url, server_kind="qvq") as remote:
        result = remote.ask(str(ball), "What happens?", think_budget=8, answer_budget=4, fps=1)
    assert result.clip is not None and result.clip.mode == "video"
    assert result.clip.timestamps == [0.0, 1.3, 2.6, 3.9]
    assert result.answer or result.thought


def test_a_clip_in_an_earlier_turn_is_400_naming_it():
    """Video is asked about in one turn: a clip in an earlier user message of a conversation is refused,
    naming its part; in the last user message it parses, with the earlier turns kept."""
    clip_turn = {
        "role": "user",
        "content": [PARTS["vllm_video_url"], {"type": "text", "text": "What happens?"}],
    }
    body = {
        "messages": [
            clip_turn,
            {"role": "assistant", "content": "A ball rolls."},
            {"role": "user", "content": "Why?"},
        ]
    }
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == "messages[0].content[0]"
    assert "last user message only" in info.value.message
    body = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, clip_turn]
    }
    req = parse_chat_request(body)
    assert len(req.videos) == 1 and len(req.history) == 2 and req.question == "What happens?"
