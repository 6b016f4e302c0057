"""A clip through mlx-vlm's Qwen models natively: its frames as video patches, its time as the family says.

mlx-vlm 0.7 runs the vision tower on ``pixel_values_videos`` and merges the features at the video pad
tokens, but its Qwen2.5-VL positions ignore the clip's time (``second_per_grid_ts``), and it cannot set
the sampling; so this module prepares everything around the tower itself, from the sampled frames
``qvq_local.video`` made:

* :func:`video_pixels`: the frames as the Qwen video processors lay them out (rescaled, normalised with the
  model's image statistics, the last frame repeated to a whole temporal patch, then cut into
  ``temporal_patch x patch x patch`` cubes in merge order), and the grid ``(t, h, w)`` in patches;
* :func:`expand_clip`: the prompt's one video block written out for the clip: ``n`` video pads (Qwen2-VL,
  Qwen2.5-VL), or, where the family writes time into the text (Qwen3-VL), one vision block per temporal
  patch with its time before it (``<1.2 seconds>``, the mean of the patch's frames, as transformers' Qwen3-VL
  processor writes it);
* :func:`mrope_positions`: the 3-D positions of the whole prompt.  A clip's temporal position is its patch
  index (``video_time == "index"``), its time (``"seconds"``: ``int(k x seconds a patch x tokens a
  second)``, Qwen2.5-VL's absolute-time M-RoPE), or 0 within each one-patch block (``"text"``).  Text after
  a vision block continues one past the block's largest position, as Qwen's release code, vLLM, mlx-vlm and
  llama.cpp do.  (transformers 5.25 continues at the block's start plus its larger spatial side instead,
  which agrees whenever the clip's temporal extent is no larger than that side; see README "Video".)

Mechanism only, numpy and mlx-vlm's model object; imported by the MLX session when a prompt carries a clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qvq_local.families import Family


@dataclass
class VideoInputs:
    """One clip ready for the vision tower and the prompt."""

    pixel_values: Any  # numpy float32 [t*h*w, C*tps*p*p]
    grid: tuple[int, int, int]  # (t, h, w) in patches (before the spatial merge)
    patch_times: list[float]  # seconds of each temporal patch (mean of its frames)
    seconds_per_patch: float  # the time one temporal patch spans (Qwen2.5-VL's second_per_grid_ts)
    merge: int

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * (h // self.merge) * (w // self.merge)

    @property
    def tokens_per_patch(self) -> int:
        _, h, w = self.grid
        return (h // self.merge) * (w // self.merge)


def video_pixels(
    frames: list,
    timestamps: list[float],
    *,
    duration: float,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
) -> VideoInputs:
    """``pixel_values_videos`` and its grid for RGB ``frames`` of one size (sides multiples of
    ``patch_size x merge_size``), laid out as transformers' Qwen video processors lay them out.

    ``duration``: the clip's length; the sampling rate is frames over it (qwen-vl-utils' and transformers'
    ``sampled_fps``), so a temporal patch spans ``temporal_patch_size / rate`` seconds."""
    import numpy as np

    if not frames:
        raise ValueError("a clip needs at least one frame")
    video = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in frames])  # T, H, W, C
    video = video / 255.0
    video = (video - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    video = video.transpose(0, 3, 1, 2)  # T, C, H, W
    times = list(timestamps)
    tps = temporal_patch_size
    if pad := (-video.shape[0]) % tps:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        times += [times[-1]] * pad
    n, c, height, width = video.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frame size {width}x{height} is not a multiple of {patch_size * merge_size}")
    gt, gh, gw = n // tps, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = video.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = np.ascontiguousarray(patches.reshape(gt * gh * gw, c * tps * p * p), dtype=np.float32)
    patch_times = [(times[i] + times[i + tps - 1]) / 2 for i in range(0, n, tps)]
    rate = len(timestamps) / duration if duration > 0 else 0.0
    return VideoInputs(
        pixel_values=flat,
        grid=(gt, gh, gw),
        patch_times=patch_times,
        seconds_per_patch=tps / rate if rate else float(tps),
        merge=merge_size,
    )


def expand_clip(text: str, family: Family, inputs: VideoInputs) -> str:
    """The prompt with its one video block written out for this clip (see the module docstring)."""
    block, pad = family.video_block, family.video_pad
    if text.count(pad) != 1:
        raise ValueError(f"the prompt holds {text.count(pad)} video blocks, not one")
    if family.video_time == "text":
        if block not in text:
            raise ValueError("the prompt's video block is not the family's")
        start, end = block.split(pad)
        one = pad * inputs.tokens_per_patch
        written = "".join(
            family.video_timestamp.format(seconds=t) + start + one + end for t in inputs.patch_times
        )
        return text.replace(block, written, 1)
    return text.replace(pad, pad * inputs.tokens, 1)


def mrope_positions(
    ids: list[int],
    *,
    image_token: int,
    video_token: int,
    image_grids: list[tuple[int, int, int]],
    video: VideoInputs | None,
    family: Family,
    tokens_per_second: int = 0,
):
    """``(positions int32 [3, L], rope_delta)`` for ``ids``: text 1-D, each image and each clip 3-D (see
    the module docstring); ``rope_delta`` = largest position + 1 - L, what later tokens add to their index."""
    import numpy as np

    # (token, temporal offsets, h, w) per vision run, h and w in merged tokens
    images = iter([(image_token, list(range(t)), h, w) for t, h, w in image_grids])
    video_blocks: list[tuple[int, list[int], int, int]] = []
    if video is not None:
        gt, gh, gw = video.grid
        m = video.merge
        if family.video_time == "text":
            video_blocks = [(video_token, [0], gh // m, gw // m) for _ in range(gt)]
        elif family.video_time == "seconds":
            interval = tokens_per_second * video.seconds_per_patch
            video_blocks = [(video_token, [int(k * interval) for k in range(gt)], gh // m, gw // m)]
        else:
            video_blocks = [(video_token, list(range(gt)), gh // m, gw // m)]
    videos = iter(video_blocks)
    out = np.zeros((3, len(ids)), dtype=np.int64)
    pos = 0
    i = 0
    while i < len(ids):
        token = ids[i]
        if token in (image_token, video_token):
            if token == image_token:
                _, offsets, h, w = next(images)
            else:
                _, offsets, h, w = next(videos)
            n = len(offsets) * h * w
            run = ids[i : i + n]
            if len(run) != n or any(t != token for t in run):
                raise ValueError("the prompt's vision tokens do not match the grids given")
            tt = np.repeat(np.asarray(offsets, np.int64), h * w)
            hh = np.tile(np.repeat(np.arange(h, dtype=np.int64), w), len(offsets))
            ww = np.tile(np.arange(w, dtype=np.int64), len(offsets) * h)
            out[0, i : i + n] = tt + pos
            out[1, i : i + n] = hh + pos
            out[2, i : i + n] = ww + pos
            pos = int(out[:, i : i + n].max()) + 1
            i += n
        else:
            out[:, i] = pos
            pos += 1
            i += 1
    delta = int(out.max()) + 1 - len(ids) if len(ids) else 0
    return out.astype(np.int32), delta


def image_grids_merged(grid_thw: Any, merge: int) -> list[tuple[int, int, int]]:
    """Image grids ``(t, h, w)`` in patches -> merged tokens per axis, as :func:`mrope_positions` takes."""
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw]


@dataclass
class PreparedClip:
    """A prompt with one clip, ready for the language model: token ids, their embeddings with the clip's
    features merged in, 3-D positions, and what the MLX session needs besides."""

    ids: list[int]
    embeds: Any  # mx.array [1, L, D]
    positions: Any  # mx.array int32 [3, 1, L]
    rope_delta: int
    video_tokens: int
    encode_s: float
    visual_pos_masks: Any = None  # Qwen3-VL's DeepStack: where the visual tokens are
    deepstack: Any = None  # and one feature array per fed text layer
    inputs: VideoInputs | None = None


def prepare_clip(
    model: Any,
    encode: Any,
    text: str,
    clip: Any,
    *,
    family: Family,
    config: dict,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    vision: bool = True,
) -> PreparedClip:
    """Tokenise ``text`` (one video block) with ``clip`` written out, run the clip through mlx-vlm's vision
    tower (``model.get_input_embeddings`` with ``pixel_values_videos``), and position it the family's way.

    ``encode``: text -> token ids (special tokens parsed, no BOS); ``config``: the model's config.json;
    ``vision`` False: ids and positions only (a saved prefix state replaces the tower's work), ``embeds``
    None.
    """
    import time

    import mlx.core as mx

    vc = config.get("vision_config") or {}
    inputs = video_pixels(
        clip.frames,
        clip.timestamps,
        duration=clip.duration,
        patch_size=int(vc.get("patch_size", family.patch_size)),
        merge_size=int(vc.get("spatial_merge_size", family.merge_size)),
        temporal_patch_size=int(vc.get("temporal_patch_size", family.temporal_patch_size)),
        image_mean=image_mean,
        image_std=image_std,
    )
    ids = list(encode(expand_clip(text, family, inputs)))
    video_token = token_id(config, "video_token_id")
    image_token = token_id(config, "image_token_id")
    if ids.count(video_token) != inputs.tokens:
        raise ValueError(
            f"the prompt holds {ids.count(video_token)} video tokens for a clip of {inputs.tokens}"
        )
    positions, delta = mrope_positions(
        ids,
        image_token=image_token,
        video_token=video_token,
        image_grids=[],
        video=inputs,
        family=family,
        tokens_per_second=family.video_time_scale(config),
    )
    if not vision:
        return PreparedClip(
            ids=ids,
            embeds=None,
            positions=mx.array(positions)[:, None, :],
            rope_delta=delta,
            video_tokens=inputs.tokens,
            encode_s=0.0,
            inputs=inputs,
        )
    t0 = time.perf_counter()
    emb = model.get_input_embeddings(
        mx.array([ids], dtype=mx.int32),
        None,
        pixel_values_videos=mx.array(inputs.pixel_values),
        video_grid_thw=mx.array([list(inputs.grid)], dtype=mx.int32),
    )
    mx.eval(emb.inputs_embeds)
    encode_s = time.perf_counter() - t0
    return PreparedClip(
        ids=ids,
        embeds=emb.inputs_embeds,
        positions=mx.array(positions)[:, None, :],
        rope_delta=delta,
        video_tokens=inputs.tokens,
        encode_s=encode_s,
        visual_pos_masks=getattr(emb, "visual_pos_masks", None),
        deepstack=getattr(emb, "deepstack_visual_embeds", None),
        inputs=inputs,
    )


def token_id(config: dict, key: str) -> int:
    """A special token's id from config.json (top level, or ``text_config`` where transformers 5 puts it)."""
    value = config.get(key)
    if value is None:
        value = (config.get("text_config") or {}).get(key)
    if value is None:
        raise ValueError(f"config.json has no {key}")
    return int(value)
