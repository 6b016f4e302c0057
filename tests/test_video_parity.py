"""A clip on each family's tiny model, against transformers' own video path (f32, CPU).

* native (MLX): the clip's frames as video patches through mlx-vlm's vision tower, laid out, written into
  the prompt and positioned by qvq (backends/mlx_video.py), vs ``Qwen*ForConditionalGeneration`` given
  ``pixel_values_videos`` / ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``): next-token logits
  within the image tolerance (1e-4, tests/test_convert_mlx.py).  The references are independent of the
  code under test: the pixel layout is mlx-vlm's numpy port of transformers' video processor (torchvision,
  which transformers' own needs, has no CPU build for this torch on PyPI), the prompt's expansion is
  transformers' processors' ``replace_video_token``, Qwen2.5-VL's seconds a patch come from transformers'
  ``VideoMetadata.sampled_fps``, and the positions are transformers' own inside its forward pass;
* frames (llama.cpp, which has no video input): each sampled frame as an image with its time before it,
  vs transformers given the same frames as images (the image tolerance, 5e-3), and how far that answer's
  logits are from the native video path's (printed: ``pytest -s``).

Measured figures print with ``-s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("av")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import clips

from qvq_local import video
from qvq_local.families import family_for_config
from qvq_local.video import VideoOptions

pytestmark = pytest.mark.parity

QUESTION = "What happens after the ball hits the fan?"
NATIVE_ATOL = 1e-4  # tests/test_convert_mlx.py's image tolerance for the MLX conversion
FRAMES_ATOL = 5e-3  # tests/test_backend_llama.py's image tolerance for llama.cpp

FAMILIES = {
    "qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2.5-vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "qwen3-vl": transformers.Qwen3VLForConditionalGeneration,
}


@pytest.fixture(scope="module")
def checkpoints(artifacts):
    """The tiny f32 checkpoint of each family."""
    from qvq_local.convert import synthetic

    out = {}
    for name in FAMILIES:
        kw = {"variant": "instruct"} if name == "qwen3-vl" else {}
        out[name] = synthetic.write_checkpoint(
            artifacts / f"video-{name}", "tiny", dtype="f32", family=name, seed=0, **kw
        )
    return out


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return clips.write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=40, fps=10, size=(160, 96))


def _clip(path, family, frames: int, side_tokens: int = 12):
    """``frames`` frames sampled over the 4 s clip, each ``side_tokens`` merged tokens or fewer."""
    f = family.image_factor
    opts = VideoOptions(
        fps=frames / 4, video_tokens=10**6, min_pixels=4 * f * f, max_pixels=side_tokens * f * f
    )
    return video.load_video(path, opts, family=family)


def _hf(ckpt: Path, name: str):
    return FAMILIES[name].from_pretrained(ckpt, dtype=torch.float32).eval()


def _reference_pixels(clip, ckpt: Path, family):
    """pixel_values_videos from mlx-vlm's numpy port of transformers' Qwen video processor (no resize: the
    frames are already on the family's grid)."""
    from mlx_vlm.models.qwen3_vl.processing_qwen3_vl import Qwen3VLVideoProcessor

    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    proc = Qwen3VLVideoProcessor(
        patch_size=family.patch_size,
        temporal_patch_size=family.temporal_patch_size,
        merge_size=family.merge_size,
        min_pixels=1,
        max_pixels=10**9,
        image_mean=pre["image_mean"],
        image_std=pre["image_std"],
    )
    out = proc(videos=[clip.frames])
    return out["pixel_values_videos"].astype(np.float32), [int(x) for x in out["video_grid_thw"][0]]


def _metadata(clip):
    """transformers' VideoMetadata of the sampled clip (source frame rate, the frames' indices)."""
    from transformers.video_utils import VideoMetadata

    fps = clip.source_fps
    return VideoMetadata(
        total_num_frames=round(clip.duration * fps),
        fps=fps,
        frames_indices=[round(t * fps) for t in clip.timestamps],
    )


def _reference_text(text: str, name: str, grid: list[int], clip) -> str:
    """The prompt with its video block expanded by transformers' own processor code."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    cls = Qwen3VLProcessor if name == "qwen3-vl" else Qwen2VLProcessor
    proc = cls.__new__(cls)
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    proc.video_token = "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [_metadata(clip)]}
    replacement = proc.replace_video_token(inputs, 0)
    wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
    if name == "qwen3-vl":  # its replacement carries a vision block per patch: the wrapper goes
        return text.replace(wrapper, replacement, 1)
    return text.replace("<|video_pad|>", replacement, 1)


def _hf_video_logits(model, ckpt: Path, name: str, text: str, clip):
    from tokenizers import Tokenizer

    pixels, grid = _reference_pixels(
        clip, ckpt, family_for_config(json.loads((ckpt / "config.json").read_text()))
    )
    full = _reference_text(text, name, grid, clip)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = tok.encode(full, add_special_tokens=False).ids
    video_id = tok.token_to_id("<|video_pad|>")
    kw = {
        "pixel_values_videos": torch.from_numpy(pixels),
        "video_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": torch.tensor([[2 if t == video_id else 0 for t in ids]]),
    }
    if name == "qwen2.5-vl":
        kw["second_per_grid_ts"] = torch.tensor([2 / _metadata(clip).sampled_fps])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **kw).logits[0, -1].float().numpy()
    return logits, ids, pixels, kw


def _mlx_logits(mlx_dir: Path, ckpt: Path, text: str, clip):
    """The MLX native path: the MLX session's prefill of a prompt carrying the clip (its logits), and the
    ids, pixels and positions backends/mlx_video.prepare_clip gives it (to compare with the references)."""
    from qvq_local.backends import mlx as backend
    from qvq_local.backends import mlx_video
    from qvq_local.backends.base import Prompt, SamplingParams

    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    loaded = backend.load(mlx_dir)
    try:
        ip = loaded.processor.image_processor
        prepared = mlx_video.prepare_clip(
            loaded.model,
            lambda s: loaded.tokenizer.encode(s, add_special_tokens=False),
            text,
            clip,
            family=family,
            config=loaded.config,
            image_mean=tuple(ip.image_mean),
            image_std=tuple(ip.image_std),
            vision=False,
        )
        session = loaded.new_session(SamplingParams(), n_ctx=4096)
        try:
            stats = session.prefill(Prompt(text=text, images=[], clip=clip))
            logits = np.array(session.last_logits())
        finally:
            session.close()
    finally:
        loaded.close()
    assert stats.image_tokens == prepared.video_tokens and stats.prompt_tokens == len(prepared.ids)
    return logits, prepared


@pytest.fixture(scope="module")
def mlx_dirs(artifacts, checkpoints):
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    return {
        name: convert_to_mlx(ckpt, artifacts / f"video-{name}-mlx", bits=None)
        for name, ckpt in checkpoints.items()
    }


# ------------------------------------------------------------------------------------------ native


@pytest.mark.mlx
@pytest.mark.parametrize(
    ("name", "frames", "side"), [("qwen2-vl", 8, 12), ("qwen2.5-vl", 4, 40), ("qwen3-vl", 8, 12)]
)
def test_mlx_native_clip_matches_transformers(name, frames, side, checkpoints, mlx_dirs, clip_file):
    """Qwen2.5-VL's clip is 2 temporal patches 4 positions apart (2 s a patch, 2 positions a second) in a
    frame 6 tokens wide: where the clip's time runs past its larger side, transformers 5.25 places the text
    after it differently from Qwen's release code (test_qwen2_5_long_clip_difference_is_reported)."""
    from qvq_local.prompt import build_prompt, load_chat_template

    ckpt = checkpoints[name]
    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    clip = _clip(clip_file, family, frames, side)
    assert len(clip.frames) == frames
    assert [clips.frame_number(f) for f in clip.frames] == [round(t * 10) for t in clip.timestamps]
    text = build_prompt(load_chat_template(ckpt), QUESTION, 0, system=None, family=family, videos=1)
    model = _hf(ckpt, name)
    ref, ref_ids, ref_pixels, _ = _hf_video_logits(model, ckpt, name, text, clip)
    ours, prepared = _mlx_logits(mlx_dirs[name], ckpt, text, clip)
    assert prepared.ids == ref_ids  # the same prompt, timestamps and pad counts included
    assert np.abs(prepared.inputs.pixel_values - ref_pixels).max() < 1e-6  # the same pixel layout
    err = float(np.abs(ours - ref).max())
    print(
        f"\n{family.name} native clip ({frames} frames, {prepared.video_tokens} video tokens): MLX vs transformers max |logit diff| {err:.3g}"
    )
    assert err < NATIVE_ATOL
    assert int(ours.argmax()) == int(ref.argmax())
    # power: the clip's frames matter (reversed frames give other logits at this tolerance)
    clip.frames.reverse()
    reversed_ref = _hf_video_logits(model, ckpt, name, text, clip)[0]
    assert float(np.abs(reversed_ref - ref).max()) > 100 * NATIVE_ATOL


@pytest.mark.mlx
def test_text_after_a_long_clip_follows_qwens_release_rule(checkpoints, mlx_dirs, clip_file):
    """16 frames (8 temporal patches) of a 2x4-token frame: the clip's time runs past its side.  Qwen's
    release code, vLLM and mlx-vlm continue the text one past the clip's largest position; transformers
    5.25 continues at the clip's start plus its larger side.  qvq follows the release rule (mlx-vlm's
    Qwen2-VL positions are the reference here) and the figure of the difference is printed."""
    import mlx.core as mx
    from mlx_vlm import load

    from qvq_local.prompt import build_prompt, load_chat_template

    name = "qwen2-vl"
    ckpt = checkpoints[name]
    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    clip = _clip(clip_file, family, 16, side_tokens=8)
    text = build_prompt(load_chat_template(ckpt), QUESTION, 0, system=None, family=family, videos=1)
    ours, prepared = _mlx_logits(mlx_dirs[name], ckpt, text, clip)
    model, _ = load(str(mlx_dirs[name]))
    release, _ = model.language_model.get_rope_index(
        mx.array([prepared.ids]), video_grid_thw=mx.array([list(prepared.inputs.grid)])
    )
    assert (np.array(release)[:, 0] == np.array(prepared.positions)[:, 0]).all()
    hf = _hf(ckpt, name)
    ref, ids, _, kw = _hf_video_logits(hf, ckpt, name, text, clip)
    hf_pos, _ = hf.model.get_rope_index(
        torch.tensor([ids]), kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"]
    )
    differ = (hf_pos[:, 0].numpy() != np.array(prepared.positions)[:, 0]).any(axis=0)
    video_id = kw["mm_token_type_ids"][0].tolist().index(2)
    last_video = max(i for i, t in enumerate(ids) if t == ids[video_id])
    assert differ.any() and not differ[: last_video + 1].any()  # the clip agrees, the text after it not
    print(
        f"\nQwen2-VL, 8 temporal patches of 2x4 tokens: positions differ from transformers 5.25 at "
        f"{int(differ.sum())} text tokens after the clip; max |logit diff| {float(np.abs(ours - ref).max()):.3g}"
    )


@pytest.mark.mlx
def test_qwen2_5_long_clip_difference_is_reported(checkpoints, mlx_dirs, clip_file):
    """8 frames on Qwen2.5-VL: the clip's time (4 patches, 2 positions a second) runs past its side, so the
    text after it sits where Qwen's release code puts it and transformers 5.25 does not: the logits differ
    by the printed amount, and only the positions of text after the clip differ."""
    from qvq_local.prompt import build_prompt, load_chat_template

    name = "qwen2.5-vl"
    ckpt = checkpoints[name]
    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    clip = _clip(clip_file, family, 8)
    text = build_prompt(load_chat_template(ckpt), QUESTION, 0, system=None, family=family, videos=1)
    hf = _hf(ckpt, name)
    ref, ids, _, kw = _hf_video_logits(hf, ckpt, name, text, clip)
    ours, prepared = _mlx_logits(mlx_dirs[name], ckpt, text, clip)
    hf_pos, _ = hf.model.get_rope_index(
        torch.tensor([ids]),
        kw["mm_token_type_ids"],
        video_grid_thw=kw["video_grid_thw"],
        second_per_grid_ts=kw["second_per_grid_ts"],
    )
    ours_pos = np.array(prepared.positions)[:, 0]
    video_id = ids[kw["mm_token_type_ids"][0].tolist().index(2)]
    last_video = max(i for i, t in enumerate(ids) if t == video_id)
    assert (hf_pos[:, 0, : last_video + 1].numpy() == ours_pos[:, : last_video + 1]).all()  # the clip itself
    assert (hf_pos[:, 0, last_video + 1 :].numpy() < ours_pos[:, last_video + 1 :]).all()  # the text after it
    print(
        f"\nQwen2.5-VL 8-frame clip: MLX (release rule) vs transformers 5.25 max |logit diff| {float(np.abs(ours - ref).max()):.3g}"
    )


# ------------------------------------------------------------------------------------------ frames


@pytest.fixture(scope="module")
def gguf_pairs(artifacts, checkpoints):
    pytest.importorskip("llama_cpp")
    from qvq_local.convert.to_gguf import convert_to_gguf

    return {
        name: convert_to_gguf(ckpt, artifacts / f"video-{name}-gguf", quant="f32", mmproj_quant="f32")
        for name, ckpt in checkpoints.items()
    }


def _hf_frames_logits(model, ckpt: Path, text: str, frames: list):
    """transformers given the frames as images (its PIL image processor, no resize: they are on the grid)."""
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    pix = proc(images=frames, size={"shortest_edge": 1, "longest_edge": 10**8}, return_tensors="pt")
    n = [int(t * h * w) // 4 for t, h, w in pix["image_grid_thw"].tolist()]
    pieces = text.split("<|image_pad|>")
    full = pieces[0] + "".join("<|image_pad|>" * k + rest for k, rest in zip(n, pieces[1:]))
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = tok.encode(full, add_special_tokens=False).ids
    pad = tok.token_to_id("<|image_pad|>")
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pix["pixel_values"],
            image_grid_thw=pix["image_grid_thw"],
            mm_token_type_ids=torch.tensor([[1 if t == pad else 0 for t in ids]]),
        )
    return out.logits[0, -1].float().numpy(), sum(n)


@pytest.mark.llama
@pytest.mark.parametrize("name", list(FAMILIES))
def test_llama_frames_path_matches_transformers_images(name, checkpoints, gguf_pairs, clip_file):
    """llama.cpp's mtmd takes no video: the clip's frames go in as images, each with its time written
    before it.  The same frames as images through transformers agree within the image tolerance; the
    distance from the native video path's logits (transformers, the same frames as video) is printed."""
    from qvq_local.backends import llamacpp
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt, load_chat_template

    ckpt = checkpoints[name]
    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    clip = _clip(clip_file, family, 4)
    labels = [family.video_timestamp.format(seconds=t) for t in clip.timestamps]
    template = load_chat_template(ckpt)
    text = build_prompt(template, QUESTION, len(clip.frames), system=None, family=family, frame_labels=labels)
    assert all(label in text for label in labels) and text.index(labels[1]) > text.index("<|image_pad|>")
    pair = gguf_pairs[name]
    loaded = llamacpp.load(pair.model, pair.mmproj)
    try:
        prompt = Prompt(text=text, images=list(clip.frames))
        session = loaded.new_session(SamplingParams(), n_ctx=loaded.context_needed(prompt, new_tokens=16))
        try:
            stats = session.prefill(prompt)
            ours = np.array(session.last_logits())
        finally:
            session.close()
    finally:
        loaded.close()
    model = _hf(ckpt, name)
    ref, image_tokens = _hf_frames_logits(model, ckpt, text, clip.frames)
    assert stats.image_tokens == image_tokens
    err = float(np.abs(ours - ref).max())
    video_text = build_prompt(template, QUESTION, 0, system=None, family=family, videos=1)
    native = _hf_video_logits(model, ckpt, name, video_text, clip)[0]
    far = float(np.abs(ours - native).max())
    print(
        f"\n{family.name} frames path ({len(clip.frames)} frames, {image_tokens} image tokens): llama.cpp vs "
        f"transformers images max |logit diff| {err:.3g}; vs the native video path {far:.3g} "
        f"(argmax {'same' if int(ours.argmax()) == int(native.argmax()) else 'different'})"
    )
    assert err < FRAMES_ATOL
    assert int(ours.argmax()) == int(ref.argmax())


@pytest.mark.mlx
@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen3-vl"])
def test_mlx_clip_prefix_state_and_chunks_give_the_same_logits(name, checkpoints, mlx_dirs, clip_file):
    """A clip's prefix state (through its last video token) restored into a new session, and a prefill in
    16-token chunks (Qwen3-VL's DeepStack features sliced per chunk), give the logits of one plain prefill;
    the restored one encodes nothing."""
    from qvq_local.backends import mlx as backend
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.backends.mlx_session import MlxSession
    from qvq_local.prompt import build_prompt, load_chat_template

    ckpt = checkpoints[name]
    family = family_for_config(json.loads((ckpt / "config.json").read_text()))
    clip = _clip(clip_file, family, 4)
    loaded = backend.load(mlx_dirs[name])
    try:
        text = build_prompt(load_chat_template(ckpt), QUESTION, 0, system=None, family=family, videos=1)
        other = build_prompt(
            load_chat_template(ckpt), "And before that?", 0, system=None, family=family, videos=1
        )
        first = loaded.new_session(SamplingParams(), n_ctx=2048)
        first.prefill(Prompt(text=text, images=[], clip=clip), keep_prefix=True)
        state, plain = first.prefix_state, np.array(first.last_logits())
        first.close()
        chunked = MlxSession(loaded, SamplingParams(), n_ctx=2048, prefill_chunk=16)
        chunked.prefill(Prompt(text=text, images=[], clip=clip))
        assert np.abs(np.array(chunked.last_logits()) - plain).max() < NATIVE_ATOL
        chunked.close()
        fresh = loaded.new_session(SamplingParams(), n_ctx=2048)
        fresh.prefill(Prompt(text=other, images=[], clip=clip))
        ref = np.array(fresh.last_logits())
        fresh.close()
        again = loaded.new_session(SamplingParams(), n_ctx=2048)
        again.prefill(Prompt(text=other, images=[], clip=clip), prefix=state)
        assert again.images_encoded == 0
        assert np.array_equal(np.array(again.last_logits()), ref)
        again.close()
    finally:
        loaded.close()
