"""What every model family declares: the facts the rest of qvq-local asks (``qvq_local.families``).

A family is one architecture as it appears in each place this project meets it: the Hugging Face
``config.json`` (``architectures`` / ``model_type``), the checkpoint's tensors, the GGUF pair llama.cpp
runs (a text architecture and an mmproj projector), the image grid the vision tower sees, and the prompt
and answer conventions of its models.  One subclass per family, one instance registered by name with
:func:`qvq_local.families.register`.

A family module holds facts only, each declared once, as a class attribute or a method of its family (as
mlx-lm keeps a model file to its args and modules).  What is done with them lives beside the code that
does it: the GGUF converter's per-family classes in ``convert/gguf_<family>.py``, the synthetic
checkpoint writers in ``convert/synth_<family>.py``, each registered under the family's name.  Nothing
here imports from ``convert/``, nor a heavy library: ``qvq --help`` imports the registry.  GGUF
identifiers come from gguf-py's own constants, imported when they are first asked for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import InputError, ModelError


class Family:
    """One model family.  Subclasses fill the class attributes and implement the methods."""

    # ---- identity
    #: Registry key and display name (``"Qwen2-VL"``).
    name: ClassVar[str]
    #: Models of the family, for messages (``"QVQ / Qwen2-VL"``).
    models: ClassVar[str]
    #: Lower-case names ``--family`` accepts besides :attr:`name` (``"qwen2-vl"``), the first one the
    #: name in lower case.
    aliases: ClassVar[tuple[str, ...]]
    #: ``config.json``'s ``architectures`` entries and ``model_type`` values that mean this family.
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_model_types: ClassVar[tuple[str, ...]]
    #: preprocessor_config.json's ``processor_class``.
    hf_processor_class: ClassVar[str]
    #: mlx-vlm can run the family's vision tower apart from the prompt (the MLX session encodes once).
    mlx_split_vision: ClassVar[bool] = False
    #: The family has layers whose memory cannot be cut back to a shorter prefix (linear attention's
    #: recurrent state): prefix reuse, chain forks and speculative rollback must not assume they can.
    recurrent_state: ClassVar[bool] = False

    # ---- tokens
    #: Special tokens in id order from ``base_vocab`` (the first special's id).
    special_tokens: ClassVar[tuple[str, ...]]
    base_vocab: ClassVar[int]
    #: One image in a rendered prompt, and the pad token the backends expand per image token.
    image_block: ClassVar[str]
    image_pad: ClassVar[str]

    # ---- prompt conventions
    #: The default system prompt, the sampling fallback (temperature, top_p, top_k, repetition_penalty)
    #: for a model that ships none, and the markers that end the thought in a reply, by language.
    system_prompt: ClassVar[str]
    sampling: ClassVar[dict[str, float | int]]
    answer_markers: ClassVar[dict[str, tuple[str, ...]]]
    #: The chat template a model folder that ships none is prompted with (one turn renders exactly as the
    #: family's published template renders it).
    fallback_chat_template: ClassVar[str]

    # ---- image grid
    #: Vision patch (px), spatial merge, the frames one patch spans in time, the processor's pixel bounds
    #: and image statistics (used where a checkpoint has no preprocessor_config.json), and the
    #: image-token bounds llama.cpp's mtmd applies to this projector.
    patch_size: ClassVar[int]
    merge_size: ClassVar[int]
    temporal_patch_size: ClassVar[int]
    processor_min_pixels: ClassVar[int]
    processor_max_pixels: ClassVar[int]
    image_mean: ClassVar[tuple[float, float, float]]
    image_std: ClassVar[tuple[float, float, float]]
    llama_image_tokens: ClassVar[tuple[int, int]]

    # ---- video (qvq_local.video samples a clip with these; the backends feed it as the family says)
    #: The pad token the backends expand per video token, and one clip in a rendered prompt.
    video_pad: ClassVar[str]
    video_block: ClassVar[str]
    #: How the model is told when each temporal patch (``temporal_patch_size`` frames) was:
    #: ``"index"``: its temporal M-RoPE position is the patch's index (Qwen2-VL); ``"seconds"``: the
    #: position is its time, ``video_tokens_per_second`` positions a second (Qwen2.5-VL's absolute-time
    #: M-RoPE, ``second_per_grid_ts``); ``"text"``: each patch is its own vision block preceded by its
    #: time written as :attr:`video_timestamp` (Qwen3-VL).
    video_time: ClassVar[str] = "index"
    #: M-RoPE positions per second of clip where :attr:`video_time` is ``"seconds"`` (the config's
    #: ``vision_config.tokens_per_second`` wins where it has one).
    video_tokens_per_second: ClassVar[int] = 0
    #: A time written into the text: before each temporal patch (``video_time == "text"``), and before each
    #: frame where a clip goes in as separate images (llama.cpp, or a model that takes no video).
    video_timestamp: ClassVar[str] = "<{seconds:.1f} seconds>"
    #: The video processor's sampling defaults (frames a second, fewest and most frames) and its pixel
    #: bounds per frame (``size.shortest_edge`` / ``size.longest_edge`` of its video processor).
    video_fps: ClassVar[float] = 2.0
    video_min_frames: ClassVar[int] = 4
    video_max_frames: ClassVar[int] = 768
    video_min_pixels: ClassVar[int]
    video_max_pixels: ClassVar[int]
    #: Lower-case pieces of model names in this family whose own card says they take no video (QVQ-72B-
    #: Preview): a clip goes to them as frames, one image each, and qvq says so.
    video_refused_by: ClassVar[tuple[str, ...]] = ()

    # ---- tensors
    #: Prefixes of the text model's and the vision tower's tensors (original naming).
    text_prefix: ClassVar[str]
    vision_prefix: ClassVar[str]
    #: Tensor-name facts the integrity checks use (widths, the merger's output, the embedding, mmproj out).
    width_tensor_suffixes: ClassVar[tuple[str, ...]]
    merger_out_suffix: ClassVar[str]
    embedding_suffix: ClassVar[str]
    mmproj_out_tensor: ClassVar[str]
    #: The published sizes (and a unit-test size), by name: the dims their config.json files carry.
    synth_shapes: ClassVar[dict[str, Any]]

    # ---- GGUF identities (besides :attr:`gguf_text_arch` and :attr:`gguf_projector`)
    #: ``tokenizer.ggml.pre`` of the text GGUF (the pre-tokenizer llama.cpp applies).
    gguf_tokenizer_pre: ClassVar[str]

    @property
    def image_factor(self) -> int:
        """Side of one image token in pixels (a patch, merged ``merge_size`` x ``merge_size``)."""
        return self.patch_size * self.merge_size

    def dims_from_config(self, config: dict[str, Any], path: Path) -> Any:
        """Typed text and vision dimensions from ``config.json`` (ModelError naming ``path`` if wrong)."""
        raise NotImplementedError

    def merger_width(self, config: dict[str, Any]) -> int | None:
        """The width the vision merger projects into (must equal the text width)."""
        raise NotImplementedError

    def expected_shapes(self, text: Any, vision: Any) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, by its original HF name, with its shape."""
        raise NotImplementedError

    def layout_shapes(
        self, text: Any, vision: Any, stored: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """The tensors to expect of a checkpoint whose files hold ``stored`` (original name -> shape): the
        published layout (:meth:`expected_shapes`) unless the files are in another layout the family
        reads, such as the one transformers 5's ``save_pretrained`` writes.  The base: the published one."""
        return self.expected_shapes(text, vision)

    def published_layout(self, text: Any, stored: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The stored tensors (original name -> stored shape) that are not in the published layout, each with
        the axes of the transpose that brings it there (what mlx-vlm 0.7 reads).  The base: none."""
        return {}

    def published_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config.json`` in the spelling the family's models were published with (mlx-vlm 0.7 reads only
        that; transformers 5's ``save_pretrained`` renames some keys).  The base: as it is."""
        return config

    def original_tensor_name(self, name: str) -> str:
        """A stored tensor name in the family's original HF naming (other transformers versions renamed
        some)."""
        raise NotImplementedError

    def is_vision_tensor(self, name: str) -> bool:
        """True for a vision-tower tensor (original naming)."""
        return name.startswith(self.vision_prefix)

    def is_unit_norm_weight(self, name: str) -> bool:
        """True for a norm weight that scales its input as it is (published values near 1), which synthetic
        checkpoints draw around 1; every other tensor is drawn around 0 (a zero-centred norm weight, which
        scales by ``1 + weight``, included)."""
        return name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight"))

    def smart_resize(
        self,
        width: int,
        height: int,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        factor: int | None = None,
    ) -> tuple[int, int]:
        """The size the family's processor resizes a ``width`` x ``height`` image to."""
        raise NotImplementedError

    def takes_video(self, model_name: str) -> bool:
        """False for a model of the family whose card says it takes no video (:attr:`video_refused_by`)."""
        name = model_name.lower()
        return not any(piece in name for piece in self.video_refused_by)

    def video_time_scale(self, config: dict[str, Any] | None = None) -> int:
        """M-RoPE positions a second of clip (``video_time == "seconds"``): the config's
        ``vision_config.tokens_per_second`` or the family's default; 0 for the other families."""
        if self.video_time != "seconds":
            return 0
        vision = (config or {}).get("vision_config")
        value = vision.get("tokens_per_second") if isinstance(vision, dict) else None
        return int(value) if isinstance(value, int) and value > 0 else self.video_tokens_per_second

    def image_tokens(self, width: int, height: int, factor: int | None = None) -> int:
        """Image tokens (after the merge) for an image already resized to ``width`` x ``height``."""
        factor = factor or self.image_factor
        return (width // factor) * (height // factor)

    def image_grid(
        self,
        width: int,
        height: int,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int | None = None,
        merge_size: int | None = None,
    ) -> tuple[int, int]:
        """``(grid_w, grid_h)`` in merged tokens for a ``width`` x ``height`` image: the family's
        :meth:`smart_resize` on its grid (``patch_size`` x ``merge_size``, the family's unless given)."""
        factor = (patch_size or self.patch_size) * (merge_size or self.merge_size)
        w, h = self.smart_resize(width, height, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
        return w // factor, h // factor

    # ---- Hugging Face config
    def matches_config(self, config: dict[str, Any]) -> bool:
        """True when ``config.json``'s architectures (or, with none, its model_type) name this family."""
        archs = config.get("architectures") or []
        if not isinstance(archs, list):
            archs = [archs]
        if archs:
            return any(a in self.hf_architectures for a in archs)
        return config.get("model_type") in self.hf_model_types

    # ---- GGUF (gguf-py's constants, imported on first use)
    @property
    def gguf_text_arch(self) -> str:
        """``general.architecture`` of the family's text GGUF."""
        raise NotImplementedError

    @property
    def gguf_projector(self) -> str:
        """``clip.projector_type`` of the family's mmproj GGUF."""
        raise NotImplementedError


def qwen_smart_resize(
    width: int, height: int, *, min_pixels: int | None, max_pixels: int | None, factor: int
) -> tuple[int, int]:
    """The Qwen-VL processors' resize rule (transformers' ``smart_resize``, llama.cpp's
    ``calc_size_preserved_ratio``), on a grid of ``factor`` pixels.

    Each side rounded to a multiple of ``factor`` (at least one ``factor``); when the area is above
    ``max_pixels`` both sides are scaled down (floored), when below ``min_pixels`` scaled up (ceiled),
    the aspect ratio kept.  ``None`` leaves that bound out.  Returns ``(width, height)`` in pixels.
    """
    if width < 1 or height < 1:
        raise InputError(f"image size {width}x{height} is empty")

    def snap(x: float, how) -> int:
        return max(factor, int(how(x / factor)) * factor)

    w, h = snap(width, round), snap(height, round)
    if max_pixels is not None and w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w, h = snap(width / beta, math.floor), snap(height / beta, math.floor)
    elif min_pixels is not None and w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w, h = snap(width * beta, math.ceil), snap(height * beta, math.ceil)
    return w, h


def check_vision_widths(
    *,
    merger_key: str,
    merger_out: int,
    text_hidden: int,
    embed_key: str,
    embed: int,
    heads: int,
    path: Path,
    heads_path: Path | None = None,
) -> None:
    """The two width rules every Qwen vision tower obeys, as one-line ModelErrors: the merger projects into
    the text width (``vision_config.<merger_key>``), and the ViT width splits into its heads."""
    if merger_out != text_hidden:
        raise ModelError(
            f"vision_config.{merger_key} {merger_out} (merger output) must equal the text hidden_size {text_hidden}",
            path=path,
        )
    if embed % heads:
        raise ModelError(
            f"vision {embed_key} {embed} is not divisible by num_heads {heads}", path=heads_path or path
        )


def need_number(cfg: dict[str, Any], key: str, path: Path, kind: type = int) -> Any:
    """``cfg[key]`` as a positive int (or a float), else a ModelError naming ``path`` and the key."""
    value = cfg.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"missing or non-numeric {key!r}", path=path)
    if kind is int:
        if int(value) != value or value <= 0:
            raise ModelError(f"{key!r} must be a positive integer, got {value!r}", path=path)
        return int(value)
    return float(value)
