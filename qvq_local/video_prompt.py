"""A clip in a question: which way it goes in, the prompt that carries it, and what the header shows.

Two ways, decided once per question:

* natively, as video patches (``Prompt.clip``): where the backend takes video (the registry's
  ``video_input`` capability: MLX, remote servers) and the model's family and card do
  (``Family.takes_video``): the clip is sampled in whole temporal patches and the prompt holds one video
  block, which the backend writes out;
* as frames, one image each with its time written before it (``<1.5 seconds>``): llama.cpp (mtmd has no
  video input) and QVQ-72B-Preview (its card: no video), which gets a one-line note saying so.  Each frame
  then costs a full image's tokens, so the same budget buys half as many frames, or smaller ones.

Mechanism apart from policy: this module only reads the clip (``qvq_local.video``) and renders the
prompt (``qvq_local.prompt``); the API asks it and hands the result to the session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.errors import InputError
from qvq_local.events import ClipInfo
from qvq_local.families import Family
from qvq_local.prompt import build_prompt
from qvq_local.video import VIDEO_SUFFIXES, Clip, VideoOptions, is_video_file, load_frames, load_video


@dataclass(frozen=True)
class ClipInput:
    """A clip a question is about: a video file (``path``) or images taken as its frames (``frames``: a
    list of files, or one folder).  ``options``: how to sample it (None: the question's)."""

    path: str | None = None
    frames: tuple[str, ...] | None = None
    options: VideoOptions | None = None
    sampled: Clip | None = None  # already sampled for this model (qvq serve samples before it queues)

    @property
    def name(self) -> str:
        if self.path is not None:
            return self.path
        frames = self.frames or ()
        return frames[0] if len(frames) == 1 else f"{len(frames)} frames"


def split_media(items: Any) -> tuple[ClipInput | None, list]:
    """``items`` (what a question is about: paths, prepared images, a :class:`ClipInput`) split into its
    clip, if any, and its images.  A path is a clip when its bytes say so (``video.is_video_file``) or its
    suffix names a video file (``video.VIDEO_SUFFIXES``: a broken clip is then told so).
    One clip a question, and no images beside it (one line otherwise)."""
    if items is None:
        return None, []
    if isinstance(items, (str, Path, ClipInput)) or not isinstance(items, (list, tuple)):
        items = [items]
    clips: list[ClipInput] = []
    images: list = []
    for item in items:
        if isinstance(item, ClipInput):
            clips.append(item)
        elif isinstance(item, (str, os.PathLike)) and (
            is_video_file(item) or Path(item).suffix.lower() in VIDEO_SUFFIXES
        ):
            clips.append(ClipInput(path=str(item)))
        else:
            images.append(item)
    if len(clips) > 1:
        raise InputError(f"{len(clips)} clips given: ask about one clip at a time")
    if clips and images:
        raise InputError("a clip and images together: ask about the clip, or about the images")
    return (clips[0] if clips else None), images


def goes_in_natively(family: Family, model_name: str, backend_takes_video: bool) -> bool:
    """True when a clip goes in as video (the backend takes it, and the model's family and card do),
    False when it goes in as frames, one image each."""
    return backend_takes_video and family.takes_video(model_name)


def temporal_patch(family: Family, native: bool) -> int:
    """Frames that share one set of tokens on that way in: the family's temporal patch natively, else 1."""
    return family.temporal_patch_size if native else 1


@dataclass
class ClipPrompt:
    """A clip ready for a session: the sampled clip, the rendered prompt, and the images it carries (the
    frames, where they go in as images)."""

    clip: Clip
    native: bool
    text: str
    images: list
    info: ClipInfo
    notes: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # as frames: each frame's time, written before it


def clip_prompt(
    source: ClipInput,
    question: str,
    *,
    family: Family,
    model_name: str,
    backend_takes_video: bool,
    options: VideoOptions,
    chat_template: str | None,
    system: str | None,
    machine: str = "cpu",
    variables: Mapping[str, object] | None = None,
) -> ClipPrompt:
    """Sample ``source`` for this model and render the single-turn prompt about it (``variables``: the
    template's, as :func:`qvq_local.prompt.build_prompt` takes them: the thinking switch)."""
    options = source.options or options
    native = goes_in_natively(family, model_name, backend_takes_video)
    temporal = temporal_patch(family, native)
    kw = {"family": family, "temporal_patch": temporal, "machine": machine}
    if source.sampled is not None:
        clip = source.sampled
        if clip.temporal_patch != temporal:
            raise ValueError(
                f"the clip was sampled in patches of {clip.temporal_patch} frames, not {temporal}"
            )
    elif source.frames is not None:
        clip = load_frames(list(source.frames), options, **kw)
    elif source.path is not None:
        clip = load_video(source.path, options, **kw)
    else:
        raise InputError("a clip needs a video file or frames")
    notes = list(clip.notes)
    if not native and not family.takes_video(model_name):
        notes.insert(
            0,
            f"{model_name} takes no video (its model card says so): the clip goes in as "
            f"{len(clip.frames)} frames, one image each",
        )
    labels: list[str] = []
    if native:
        text = build_prompt(chat_template, question, 0, system, family=family, videos=1, variables=variables)
        images: list = []
        tokens = clip.tokens
    else:
        labels = [family.video_timestamp.format(seconds=t) for t in clip.timestamps]
        text = build_prompt(
            chat_template,
            question,
            len(clip.frames),
            system,
            family=family,
            frame_labels=labels,
            variables=variables,
        )
        images = list(clip.frames)
        tokens = len(clip.frames) * family.image_tokens(*clip.frame_size)
    info = ClipInfo(
        path=clip.path,
        duration_s=round(clip.duration, 3),
        timestamps=list(clip.timestamps),
        source_size=tuple(clip.source_size),
        frame_size=tuple(clip.frame_size),
        tokens=tokens,
        mode="video" if native else "frames",
        decode_s=clip.decode_s,
        notes=notes,
    )
    return ClipPrompt(
        clip=clip, native=native, text=text, images=images, info=info, notes=notes, labels=labels
    )


def prefix_key_part(prepared: ClipPrompt) -> dict:
    """What a clip adds to a prefix-cache key: its sampled frames' pixels and times (a digest), how it went
    in, and the sampling settings that chose them."""
    return {
        "clip": prepared.clip.fingerprint(),
        "mode": prepared.info.mode,
        "frames": len(prepared.clip.frames),
        "frame_size": list(prepared.clip.frame_size),
    }
