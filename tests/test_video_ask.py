"""`qvq ask` with a clip on both backends: the native video path (MLX) and frames as images (llama.cpp, and
QVQ-72B-Preview whose card takes no video), the clip in --json and --save, the second question from the
prefix cache, and one line for a bad clip before any model loads."""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_error
from typer.testing import CliRunner

pytest.importorskip("av")

import clips

from qvq_local.cli import app

runner = CliRunner()
QUESTION = "What happens after the ball hits the fan?"
BUDGETS = ["--think-budget", "8", "--answer-budget", "4", "--seed", "1", "--no-loop-stop"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    monkeypatch.delenv("QVQ_BACKEND", raising=False)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return clips.write_clip(tmp_path_factory.mktemp("clip") / "ball.mp4", frames=40, fps=10)


def _ask(*args: str):
    return runner.invoke(app, ["ask", *args])


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.mlx
def test_mlx_asks_about_a_clip_natively_and_reuses_it(clip_path, tiny_mlx_f32, tmp_path):
    pytest.importorskip("mlx_vlm")
    save = tmp_path / "run.md"
    args = [str(clip_path), QUESTION, "-m", str(tiny_mlx_f32), "--backend", "mlx", "--json", *BUDGETS]
    data = _json(_ask(*args, "--fps", "1", "--save", str(save)))
    clip = data["qvq"]["clip"]
    assert clip["mode"] == "video" and clip["frames"] == 4 and clip["duration_s"] == 4.0
    assert clip["timestamps"] == [0.0, 1.3, 2.6, 3.9]
    assert clip["tokens"] > 0 and data["usage"]["prompt_tokens"] > clip["tokens"]
    settings = data["qvq"]["settings"]
    assert settings["video"] == {"mode": "video", "fps": 1.0, "max_frames": 768, "video_tokens": 768}
    assert settings["prefix_cache"]["source"] == "fresh"
    assert "sampled at (seconds): 0.00, 1.30, 2.60, 3.90" in save.read_text()
    again = _json(_ask(str(clip_path), "And before that?", *args[2:], "--fps", "1"))
    assert again["qvq"]["settings"]["prefix_cache"]["source"] == "disk"  # the clip is not encoded again
    other = _json(_ask(str(clip_path), "And before that?", *args[2:], "--fps", "2"))
    assert other["qvq"]["settings"]["prefix_cache"]["source"] == "fresh"  # another sampling, another key


@pytest.mark.mlx
def test_qvq_takes_the_clip_as_frames_and_says_so(clip_path, tiny_mlx_f32, tmp_path):
    """QVQ-72B-Preview's card says it takes no video: its clip goes in as frames, in one line."""
    pytest.importorskip("mlx_vlm")
    qvq = tmp_path / "QVQ-72B-Preview-tiny"
    qvq.symlink_to(tiny_mlx_f32, target_is_directory=True)
    result = _ask(str(clip_path), QUESTION, "-m", str(qvq), "--backend", "mlx", *BUDGETS)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes and re.search(
        r"QVQ-72B-Preview-tiny takes no video .*: the clip goes in as \d+ frames", notes[0]
    )
    assert re.search(r"ball\.mp4 \(4\.0s, video as \d+ frames", result.stderr)


@pytest.mark.llama
def test_llama_takes_the_clip_as_frames(clip_path, tiny_gguf_f32):
    pytest.importorskip("llama_cpp")
    args = [str(clip_path), QUESTION, "-m", str(tiny_gguf_f32.model), "--backend", "llama", *BUDGETS]
    data = _json(_ask(*args, "--json", "--video-tokens", "540"))
    clip = data["qvq"]["clip"]
    assert clip["mode"] == "frames" and clip["frames"] == 4 and clip["tokens"] == 4 * 135
    assert len(data["qvq"]["images"]) == 4 and data["qvq"]["images"][1]["path"].endswith("@ 1.30s")
    plain = _ask(*args, "--video-tokens", "540")
    assert plain.exit_code == 0 and "video as 4 frames, 420×252, 540 image tokens" in plain.stderr


@pytest.mark.llama
def test_frames_flag_makes_a_clip_of_a_folder(tiny_gguf_f32, tmp_path):
    from PIL import Image

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(clips.numbered_frame(i)).save(folder / f"shot{i}.png")
    data = _json(_ask("--frames", str(folder), QUESTION, "-m", str(tiny_gguf_f32.model), "--json", *BUDGETS))
    assert data["qvq"]["clip"]["timestamps"] == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: clips.write_audio_only(d / "talk.m4a"), "has no video stream"),
        (
            lambda d: (d / "cut.mp4").write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(64)) and d / "cut.mp4",
            "not a readable video",
        ),
        # named as a clip, though its bytes are none: told it is no video, not that it is no image
        (
            lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4",
            "is an empty file (0 bytes), not a video",
        ),
        (
            lambda d: (d / "notes.mov").write_text("not a clip\n" * 40) and d / "notes.mov",
            "not a readable video",
        ),
        (lambda d: d / "missing.mkv", "no such video file"),
    ],
)
def test_a_bad_clip_is_one_line_before_any_model_loads(make, words, tmp_path):
    path = make(tmp_path)
    result = _ask(str(path), QUESTION, "-m", str(tmp_path / "no-such-model"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert_error(lines[0], re.escape(words), path=path)


def test_bad_video_options_are_one_line(clip_path, tmp_path):
    for flag, value, words in (
        ("--fps", "0", "--fps"),
        ("--video-tokens", "0", "--video-tokens"),
        ("--max-frames", "-1", "--max-frames"),
    ):
        result = _ask(str(clip_path), QUESTION, flag, value, "-m", str(tmp_path / "none"))
        assert result.exit_code == 2, result.output
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.llama
def test_a_clip_with_earlier_turns_is_one_line(clip_path, tiny_gguf_f32):
    """Video is asked about in one turn: the API refuses a clip after earlier turns before any prefill."""
    from qvq_local import load
    from qvq_local.conversation import Turn
    from qvq_local.errors import InputError

    model = load(str(tiny_gguf_f32.model), backend="llama")
    try:
        history = [Turn.user("What is this?"), Turn.assistant("A ball.")]
        with pytest.raises(InputError) as raised:
            model.ask(str(clip_path), QUESTION, history=history, think_budget=4, answer_budget=2)
        message = str(raised.value)
        assert "a clip is asked about in a conversation's first turn only" in message and "\n" not in message
    finally:
        model.close()
