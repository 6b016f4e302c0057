"""The content parts a clip goes to a server in: the documented forms, and frames that survive the trip."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

pytest.importorskip("av")

import clips

from qvq_local import video
from qvq_local.backends import remote_media
from qvq_local.serve.schema import parse_chat_request
from qvq_local.video import VideoOptions

PARTS = json.loads((Path(__file__).parent / "data" / "remote" / "video_parts.json").read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = clips.write_clip(tmp_path_factory.mktemp("c") / "c.mp4", frames=40, fps=10)
    return video.load_video(path, VideoOptions(fps=2, min_pixels=28 * 28 * 4, video_tokens=100_000))


def _keys(obj) -> object:
    """The shape of a part: its keys, nested, without values."""
    if isinstance(obj, dict):
        return {k: _keys(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_keys(obj[0])] if obj else []
    return type(obj).__name__


def test_each_kind_gets_its_documented_form(clip):
    dash = remote_media.clip_parts(clip, "qvq-max")
    assert _keys(dash[0]) == {**_keys(PARTS["dashscope_image_list"]), "fps": "float"}
    assert len(dash[0]["video"]) == len(clip.frames) and dash[0]["fps"] == pytest.approx(
        len(clip.frames) / 4.0
    )
    vllm = remote_media.clip_parts(clip, "vllm")
    assert _keys(vllm[0]) == _keys(PARTS["vllm_video_url"])
    assert vllm[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    llama = remote_media.clip_parts(clip, "llama-server")
    assert [p["type"] for p in llama] == ["text", "image_url"] * len(clip.frames)
    assert llama[0]["text"] == "<0.0 seconds>"
    # qvq serve reads every form it is sent
    for parts in (dash, vllm):
        body = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "q"}]}]}
        assert len(parse_chat_request(body).videos) == 1


def test_the_mp4_carries_the_sampled_frames_at_their_times(clip, tmp_path):
    data = base64.b64decode(remote_media.clip_parts(clip, "vllm")[0]["video_url"]["url"].split(",", 1)[1])
    path = tmp_path / "sent.mp4"
    path.write_bytes(data)
    again = video.load_video(path, VideoOptions(fps=10, min_pixels=28 * 28 * 4, video_tokens=100_000))
    sent = [clips.frame_number(f) for f in clip.frames]
    assert sorted(set(clips.frame_number(f) for f in again.frames)) == sorted(set(sent))
    got = {clips.frame_number(f): t for f, t in zip(again.frames, again.timestamps)}
    for number, t in zip(sent, clip.timestamps):
        assert got[number] == pytest.approx(t, abs=0.002)


# ------------------------------------------------------------------------------------------ requests sent


@pytest.fixture
def replay():
    from test_openai_backend import _Replay

    made = []

    def make(*args, **kwargs):
        made.append(_Replay(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize(
    ("owned_by", "fixture", "model", "form"),
    [
        ("system", "qvq_max_stream.sse", "qvq-max", "video"),  # QVQ-Max takes video (DashScope's list)
        ("vllm", "vllm_reasoning_stream.sse", "Qwen/Qwen2.5-VL-7B-Instruct", "video_url"),
        ("vllm", "vllm_reasoning_stream.sse", "Qwen/QVQ-72B-Preview", "frames"),  # its card: no video
    ],
)
def test_the_remote_backend_sends_the_documented_form(
    replay, clip, owned_by, fixture, model, form, monkeypatch
):
    from qvq_local.api import load

    monkeypatch.setenv("DASHSCOPE_API_KEY", "k")
    server = replay(owned_by, [fixture], model=model)
    with load(model, backend="openai", base_url=server.url, api_key="k") as remote:
        result = remote.ask(clip.path, "What happens?", fps=2)
    parts = server.bodies[0]["messages"][-1]["content"]
    kinds = [p["type"] for p in parts]
    if form == "video":
        assert kinds == ["video", "text"] and parts[0]["fps"] > 0
        assert len(parts[0]["video"]) == len(result.clip.timestamps)
    elif form == "video_url":
        assert kinds == ["video_url", "text"] and parts[0]["video_url"]["url"].startswith(
            "data:video/mp4;base64,"
        )
    else:
        n = len(result.clip.timestamps)
        assert kinds == ["text", "image_url"] * n + ["text"]
        assert [p["text"] for p in parts[:-1:2]] == [f"<{t:.1f} seconds>" for t in result.clip.timestamps]
        assert result.clip.mode == "frames"
