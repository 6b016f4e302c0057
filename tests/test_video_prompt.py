"""Which way a clip goes into a question, and the prompt and header facts that follow."""

from __future__ import annotations

import pytest

pytest.importorskip("av")

import clips
from qvq_local.convert.synth_qwen2vl import chat_template

from qvq_local.errors import InputError
from qvq_local.families import qwen2_5vl, qwen2vl, qwen3vl
from qvq_local.video import VideoOptions
from qvq_local.video_prompt import ClipInput, clip_prompt, prefix_key_part, split_media

OPTS = VideoOptions(fps=2, min_pixels=28 * 28 * 4, video_tokens=100_000)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return clips.write_clip(tmp_path_factory.mktemp("c") / "c.mp4", frames=40, fps=10)


def _prompt(path, family, model="Qwen2-VL-7B", native=True, template=None):
    return clip_prompt(
        ClipInput(path=str(path)),
        "What happens?",
        family=family,
        model_name=model,
        backend_takes_video=native,
        options=OPTS,
        chat_template=template,
        system=None,
    )


def test_split_media(clip_path, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert split_media([str(clip_path)]) == (ClipInput(path=str(clip_path)), [])
    assert split_media(str(image)) == (None, [str(image)])
    frames = ClipInput(frames=(str(image),))
    assert split_media(frames) == (frames, [])
    with pytest.raises(InputError, match="2 clips given"):
        split_media([clip_path, clip_path])
    with pytest.raises(InputError, match="a clip and images together"):
        split_media([clip_path, image])


def test_native_path_holds_one_video_block(clip_path):
    for family in (qwen2vl.FAMILY, qwen2_5vl.FAMILY, qwen3vl.FAMILY):
        p = _prompt(clip_path, family)
        assert p.native and p.images == [] and p.text.count(family.video_block) == 1
        assert p.info.mode == "video" and len(p.clip.frames) == 8 and len(p.clip.frames) % 2 == 0
        f = family.image_factor
        w, h = p.clip.frame_size
        assert p.info.tokens == 4 * (w // f) * (h // f)  # 8 frames, 2 a temporal patch
        assert p.notes == p.clip.notes


def test_frames_path_labels_each_frame_and_pays_for_each(clip_path):
    p = _prompt(clip_path, qwen2_5vl.FAMILY, native=False, template=chat_template(""))
    n = len(p.clip.frames)
    assert not p.native and len(p.images) == n and p.text.count(qwen2_5vl.FAMILY.image_block) == n
    assert "<0.0 seconds>" in p.text and p.info.mode == "frames"
    f = qwen2_5vl.FAMILY.image_factor
    w, h = p.clip.frame_size
    assert p.info.tokens == n * (w // f) * (h // f)
    assert not any("takes no video" in note for note in p.notes)


def test_qvq_gets_frames_and_says_so(clip_path):
    p = _prompt(clip_path, qwen2vl.FAMILY, model="QVQ-72B-Preview-4bit", native=True)
    assert not p.native and p.info.mode == "frames"
    assert p.notes[0].startswith(
        "QVQ-72B-Preview-4bit takes no video (its model card says so): the clip goes in as"
    )
    assert p.info.notes == p.notes


def test_prefix_key_follows_pixels_and_sampling(clip_path):
    a = prefix_key_part(_prompt(clip_path, qwen2vl.FAMILY))
    b = prefix_key_part(_prompt(clip_path, qwen2vl.FAMILY))
    c = prefix_key_part(
        clip_prompt(
            ClipInput(
                path=str(clip_path), options=VideoOptions(fps=1, min_pixels=3136, video_tokens=100_000)
            ),
            "q",
            family=qwen2vl.FAMILY,
            model_name="m",
            backend_takes_video=True,
            options=OPTS,
            chat_template=None,
            system=None,
        )
    )
    assert a == b and a != c
