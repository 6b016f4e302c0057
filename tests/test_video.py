"""qvq_local.video: which frames a clip gives, at what size and cost, and one line for every bad clip.

Every clip is written here with PyAV (tests/clips.py), each frame showing its own number, so a test reads
back exactly which frames were sampled and checks them against the frames on screen at the planned times.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from helpers import assert_error

pytest.importorskip("av")

import clips

from qvq_local import video
from qvq_local.errors import InputError, MediaTooLarge
from qvq_local.families import FAMILIES, qwen2_5vl, qwen2vl, qwen3vl
from qvq_local.video import VideoOptions

# small frames for the sampler's tests: the family's least video frame (128 tokens) would upscale them
SMALL = {"min_pixels": 28 * 28 * 4, "video_tokens": 100_000}


def _fails(call, cls, *words, path=None) -> None:
    """``call()`` raises ``cls`` with a one-line message naming ``path`` and saying each of ``words``."""
    with pytest.raises(cls) as info:
        call()
    assert_error(info, *(re.escape(w) for w in words), path=path)


def _expected(times_written: list[float], targets) -> list[int]:
    """The frame on screen at each target: the last one whose time is at or before it."""
    out = []
    for t in targets:
        on = [i for i, ft in enumerate(times_written) if ft <= t + 1e-6]
        out.append(on[-1] if on else 0)
    return out


# ------------------------------------------------------------------------------------------ sampling


def test_constant_rate_clip_samples_the_planned_frames(tmp_path):
    """100 frames at 10 fps, sampled at 1 a second: 10 frames evenly from the first to the last."""
    path = clips.write_clip(tmp_path / "c.mp4", frames=100, fps=10)
    clip = video.load_video(path, VideoOptions(fps=1, **SMALL))
    numbers = [clips.frame_number(f) for f in clip.frames]
    assert len(numbers) == 10
    targets = [i * 9.9 / 9 for i in range(10)]
    assert (
        numbers == _expected([i / 10 for i in range(100)], targets) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    )
    assert clip.timestamps == pytest.approx([n / 10 for n in numbers])
    assert clip.duration == pytest.approx(10.0)


def test_variable_frame_rate_is_sampled_by_time_not_index(tmp_path):
    """Frames bunched and spread: index-based sampling would pick 0, 2, 4, 6, 8; by time the frame on
    screen at each time is picked, and the reported timestamps are those frames' own."""
    written = [0.0, 0.1, 0.2, 1.5, 1.6, 3.0, 3.05, 3.1, 5.0, 5.1]
    for suffix in ("mp4", "mkv"):
        path = clips.write_clip(tmp_path / f"v.{suffix}", times=written, fps=10)
        clip = video.load_video(path, VideoOptions(fps=2, **SMALL))
        numbers = [clips.frame_number(f) for f in clip.frames]
        n = len(numbers)
        assert n % 2 == 0 and n >= 4
        last = 5.1 if suffix == "mp4" else clip.duration - 0.1
        expected = _expected(written, [i * last / (n - 1) for i in range(n)])
        assert numbers == expected, suffix
        assert clip.timestamps == pytest.approx([written[i] for i in expected], abs=1e-3)
        assert numbers != [round(i * (len(written) - 1) / (n - 1)) for i in range(n)]  # not by index


def test_a_long_clip_costs_its_sampled_frames_not_its_length(tmp_path):
    """A 60 s clip of 1500 frames (a keyframe a second) sampled at 0.1 fps: each sample is reached by a
    seek and decoded from the keyframe before it, so at most a keyframe interval is decoded per sample."""
    path = clips.write_clip(tmp_path / "long.mp4", frames=1500, fps=25, gop=25, size=(160, 96))
    clip = video.load_video(path, VideoOptions(fps=0.1, **SMALL))
    numbers = [clips.frame_number(f) % 1024 for f in clip.frames]
    targets = [i * (1499 / 25) / (len(numbers) - 1) for i in range(len(numbers))]
    assert numbers == [n % 1024 for n in _expected([i / 25 for i in range(1500)], targets)]
    assert clip.seeks >= len(numbers) - 1
    assert clip.decoded_frames <= len(numbers) * 26 < 1500 // 4


def test_display_matrix_turns_frames_upright(tmp_path):
    """The red marker sits in the stored frame's top-left: a matrix turning the picture 90 degrees
    clockwise puts it top-right and swaps the frame's sides; 180 puts it bottom-right."""
    for ccw, corner in ((-90, "tr"), (90, "bl"), (180, "br")):
        path = clips.write_clip(tmp_path / f"r{ccw}.mp4", frames=8, fps=4, rotation=ccw)
        clip = video.load_video(path, VideoOptions(**SMALL))
        assert {clips.red_corner(f) for f in clip.frames} == {corner}, ccw
        w, h = clip.frame_size
        if ccw in (90, -90):
            assert clip.source_size == (96, 160) and h > w
            assert any("turned" in note for note in clip.notes)
        else:
            assert clip.source_size == (160, 96) and w > h
        assert all(f.size == clip.frame_size for f in clip.frames)


def test_token_budget_sets_the_frame_size_and_then_the_frame_count():
    fam = qwen2vl.FAMILY
    common = {"duration": 10.0, "last_time": 9.9, "frame_count": 100, "width": 640, "height": 360}
    big = video.plan_clip(**common, family=fam, options=VideoOptions(video_tokens=20_000))
    small = video.plan_clip(**common, family=fam, options=VideoOptions(video_tokens=2_000))
    assert len(big.times) == len(small.times) == 20  # 2 a second, whole patches
    assert big.tokens <= 20_000 and small.tokens <= 2_000
    assert big.frame_size[0] > small.frame_size[0]
    f = fam.image_factor
    assert small.tokens == 10 * (small.frame_size[0] // f) * (small.frame_size[1] // f)
    # 768 tokens hold 6 patches of the family's least frame (128 tokens): 12 of the 20 frames, evenly
    tight = video.plan_clip(**common, family=fam, options=VideoOptions(video_tokens=768))
    assert len(tight.times) == 12 and tight.tokens <= 768
    assert tight.times[0] == 0 and tight.times[-1] == pytest.approx(9.9)
    assert any("12 of 20 frames" in note for note in tight.notes)
    with pytest.raises(InputError, match="--video-tokens 100 is below"):
        video.plan_clip(**common, family=fam, options=VideoOptions(video_tokens=100))


def test_frame_count_follows_qwens_processors():
    """frames = duration x fps, at least 4, at most max_frames and the clip's own, in whole patches."""
    fam = qwen2vl.FAMILY
    opts = VideoOptions(video_tokens=10**6, min_pixels=784)

    def n(duration, frames, **kw):
        o = VideoOptions(**{**opts.__dict__, **kw})
        return len(
            video.plan_clip(
                duration=duration,
                last_time=duration,
                frame_count=frames,
                width=64,
                height=64,
                family=fam,
                options=o,
            ).times
        )

    assert n(10.0, 300) == 20
    assert n(10.3, 309) == 20  # 20.6 -> 20
    assert n(0.5, 15) == 4  # at least 4
    assert n(0.5, 3) == 2  # but no more than the clip has, in whole patches
    assert n(100.0, 3000, max_frames=31) == 30
    assert n(10.0, 300, fps=0.5) == 4
    assert n(10.0, 300, fps=1.5) == 14  # 15 -> whole patches
    # one image a frame: no pairing
    one = video.plan_clip(
        duration=10.3,
        last_time=10.3,
        frame_count=309,
        width=64,
        height=64,
        family=fam,
        options=opts,
        temporal_patch=1,
    )
    assert len(one.times) == 20


def test_family_grid_sizes_frames():
    """Frame sides are multiples of the family's token side: 28 (Qwen2-VL, 2.5-VL), 32 (Qwen3-VL)."""
    for fam in FAMILIES.values():
        plan = video.plan_clip(
            duration=4,
            last_time=3.9,
            frame_count=40,
            width=1280,
            height=720,
            family=fam,
            options=VideoOptions(),
        )
        f = fam.image_factor
        assert plan.frame_size[0] % f == 0 and plan.frame_size[1] % f == 0
        assert plan.tokens <= video.video_token_default("cpu")


def test_video_facts_are_the_processors_own():
    """Pixel bounds and frame bounds of each family against transformers' own video processors (their
    source is read, not imported: Qwen2-VL's needs torchvision)."""
    import transformers

    root = Path(transformers.__file__).parent / "models"

    def class_values(path: Path, cls: str) -> dict:
        tree = ast.parse(path.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        out = {}
        for item in node.body:
            if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                try:
                    out[item.targets[0].id] = ast.literal_eval(item.value)
                except ValueError:
                    try:
                        out[item.targets[0].id] = eval(compile(ast.Expression(item.value), "x", "eval"))  # noqa: S307
                    except Exception:  # noqa: BLE001
                        pass
        return out

    q2 = class_values(root / "qwen2_vl" / "video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor")
    q3 = class_values(root / "qwen3_vl" / "video_processing_qwen3_vl.py", "Qwen3VLVideoProcessor")
    for fam, ref in ((qwen2vl.FAMILY, q2), (qwen2_5vl.FAMILY, q2), (qwen3vl.FAMILY, q3)):
        assert fam.video_min_pixels == ref["size"]["shortest_edge"], fam.name
        assert fam.video_max_pixels == ref["size"]["longest_edge"], fam.name
        assert fam.video_min_frames == ref["min_frames"] and fam.video_max_frames == ref["max_frames"]
        assert fam.temporal_patch_size == ref["temporal_patch_size"] == 2
    assert qwen3vl.FAMILY.video_fps == q3["fps"] == 2
    assert qwen2vl.FAMILY.video_time == "index"
    assert qwen2_5vl.FAMILY.video_time == "seconds" and qwen3vl.FAMILY.video_time == "text"
    assert qwen2_5vl.FAMILY.video_time_scale({"vision_config": {"tokens_per_second": 2}}) == 2
    assert qwen2_5vl.FAMILY.video_time_scale({}) == 2 and qwen2vl.FAMILY.video_time_scale({}) == 0
    assert qwen2vl.FAMILY.takes_video(
        "qvq-max"
    )  # QVQ-Max takes video; only QVQ-72B-Preview's card refuses it
    assert not qwen2vl.FAMILY.takes_video("QVQ-72B-Preview-4bit") and qwen2vl.FAMILY.takes_video(
        "Qwen2-VL-7B"
    )


# ------------------------------------------------------------------------------------------ what is a clip


def test_is_video_file(tmp_path):
    from PIL import Image

    assert video.is_video_file(clips.write_clip(tmp_path / "a.mp4", frames=4))
    assert video.is_video_file(clips.write_clip(tmp_path / "a.mkv", frames=4))
    assert video.is_video_file(clips.write_clip(tmp_path / "a.ts", frames=4))
    assert video.is_video_file(clips.write_clip(tmp_path / "a.avi", frames=4))
    assert video.is_video_file(clips.write_animated(tmp_path / "anim.gif"))
    assert video.is_video_file(clips.write_animated(tmp_path / "anim.png"))
    Image.new("RGB", (8, 8)).save(tmp_path / "still.gif")
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    assert not video.is_video_file(tmp_path / "still.gif")
    assert not video.is_video_file(tmp_path / "still.png")
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    assert not video.is_video_file(tmp_path / "photo.heic")
    assert not video.is_video_file(tmp_path / "missing.mp4")


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_animated_images_are_clips(tmp_path, suffix):
    """A GIF or APNG of 6 frames, 100 ms each: a 0.6 s clip; every frame is there to sample at 10 fps."""
    path = clips.write_animated(tmp_path / f"anim{suffix}", frames=6, size=(160, 96))
    clip = video.load_video(path, VideoOptions(fps=10, **SMALL))
    assert [clips.frame_number(f) for f in clip.frames] == [0, 1, 2, 3, 4, 5][: len(clip.frames)]
    assert len(clip.frames) in (4, 6) and clip.duration == pytest.approx(0.6, abs=0.11)


def test_frames_from_a_folder_in_natural_order_and_from_a_list(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(clips.numbered_frame(i)).save(folder / f"frame{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    clip = video.load_frames([folder], VideoOptions(fps=2, **SMALL))
    assert [clips.frame_number(f) for f in clip.frames] == list(range(12))  # frame10 after frame9
    assert clip.timestamps == pytest.approx([i / 2 for i in range(12)]) and clip.kind == "frames"
    few = video.load_frames([folder], VideoOptions(fps=2, max_frames=4, **SMALL))
    assert [clips.frame_number(f) for f in few.frames] == [0, 4, 7, 11]
    files = [folder / "frame3.png", folder / "frame1.png"]
    listed = video.load_frames(files, VideoOptions(**SMALL))
    assert [clips.frame_number(f) for f in listed.frames] == [3, 1]
    Image.fromarray(clips.numbered_frame(5, 320, 96)).save(tmp_path / "wide.png")
    mixed = video.load_frames([folder / "frame0.png", tmp_path / "wide.png"], VideoOptions(**SMALL))
    assert len({f.size for f in mixed.frames}) == 1 and any("resized" in n for n in mixed.notes)
    _fails(
        lambda: video.load_frames([tmp_path / "nothing"], VideoOptions()),
        InputError,
        path=tmp_path / "nothing",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(lambda: video.load_frames([empty], VideoOptions()), InputError, "no image files")


def test_fingerprint_follows_pixels_and_sampling(tmp_path):
    path = clips.write_clip(tmp_path / "c.mp4", frames=40, fps=10)
    a = video.load_video(path, VideoOptions(fps=2, **SMALL))
    b = video.load_video(path, VideoOptions(fps=2, **SMALL))
    c = video.load_video(path, VideoOptions(fps=1, **SMALL))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_machine_defaults():
    assert video.video_token_default("cpu") < video.video_token_default("gpu")
    assert video.video_token_default("anything else") == video.video_token_default("cpu")


# ------------------------------------------------------------------------------------------ bad clips


def test_bad_files_are_one_line_each(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello, this is not a video\n" * 20)
    (tmp_path / "noise.mp4").write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(range(256)) * 8)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    cases = [
        (tmp_path / "missing.mp4", "no such video file"),
        (tmp_path / "empty.mp4", "empty file"),
        (folder, "is a folder"),
        (tmp_path / "text.mp4", "not a readable video"),
        (tmp_path / "noise.mp4", "not a readable video"),
        (clips.write_audio_only(tmp_path / "audio.m4a"), "has no video stream (only audio)"),
        (clips.write_empty_video(tmp_path / "zero.mkv"), "has no frames"),
        (clips.write_empty_video(tmp_path / "zero.mp4"), "no streams at all"),
    ]
    for path, words in cases:
        _fails(lambda p=path: video.load_video(p, VideoOptions(**SMALL)), InputError, words, path=path)
    # FFmpeg's errno and its quoting of the path stay out of the message (the message names the file)
    with pytest.raises(InputError) as raised:
        video.load_video(tmp_path / "text.mp4", VideoOptions(**SMALL))
    assert "Errno" not in str(raised.value) and "'" + str(tmp_path) not in str(raised.value)


def test_truncated_files(tmp_path):
    """A Matroska clip cut in half keeps its first half (the later samples repeat its last frame, and the
    clip says so); an MP4 cut before its index is no clip at all; one cut inside its first frame has none."""
    whole = clips.write_clip(tmp_path / "whole.mkv", frames=40, fps=10)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    clip = video.load_video(cut, VideoOptions(fps=2, **SMALL))
    numbers = [clips.frame_number(f) for f in clip.frames]
    assert (
        numbers[0] == 0 and max(numbers) < 39 and any("ends at" in n or "same frame" in n for n in clip.notes)
    )
    mp4 = clips.write_clip(tmp_path / "whole.mp4", frames=40, fps=10).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    _fails(
        lambda: video.load_video(tmp_path / "cut.mp4", VideoOptions(**SMALL)),
        InputError,
        path=tmp_path / "cut.mp4",
    )
    (tmp_path / "stub.mkv").write_bytes(data[:300])
    _fails(
        lambda: video.load_video(tmp_path / "stub.mkv", VideoOptions(**SMALL)),
        InputError,
        path=tmp_path / "stub.mkv",
    )


def test_limits_are_refused_from_the_header(tmp_path, monkeypatch):
    """A 9000x9000 GIF (1-pixel frames inside, a few bytes on disk) and a clip over a duration limit are
    MediaTooLarge (the server's 413) before any frame is decoded."""
    huge = clips.write_huge_gif(tmp_path / "huge.gif")
    assert video.is_video_file(huge)
    _fails(lambda: video.load_video(huge), MediaTooLarge, "9000x9000", path=huge)
    _fails(lambda: video.probe_video(huge), MediaTooLarge, "too large to decode safely")
    path = clips.write_clip(tmp_path / "c.mp4", frames=40, fps=10)
    decoded = []
    monkeypatch.setattr(video._FrameReader, "frame_at", lambda self, t: decoded.append(t))
    _fails(lambda: video.load_video(path, VideoOptions(max_duration=2)), MediaTooLarge, "over the 2 s limit")
    assert decoded == []
    header = video.probe_video(path)
    assert header.duration == pytest.approx(4.0) and (header.width, header.height) == (160, 96)


def test_options_are_checked_before_any_file(tmp_path):
    for opts, words in (
        (VideoOptions(fps=0), "--fps"),
        (VideoOptions(fps=float("nan")), "--fps"),
        (VideoOptions(max_frames=0), "--max-frames"),
        (VideoOptions(video_tokens=-5), "--video-tokens"),
    ):
        _fails(lambda o=opts: video.load_video(tmp_path / "missing.mp4", o), InputError, words)


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    path = clips.write_clip(tmp_path / "c.mp4", frames=4)
    monkeypatch.setitem(sys.modules, "av", None)
    _fails(lambda: video.load_video(path), InputError, "PyAV", "qvq-local[video]")
