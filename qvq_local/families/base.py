"""What every model family declares: the interface the rest of qvq-local asks (``qvq_local.families``).

A family is one architecture as it appears in each place this project meets it: the Hugging Face
``config.json`` (``architectures`` / ``model_type``), the checkpoint's tensors, the GGUF pair llama.cpp
runs (a text architecture and an mmproj projector), the image grid the vision tower sees, and the prompt
and answer conventions of its models.  One subclass per family, one instance registered by name in
``families/__init__.py`` (as llama.cpp's converter registers one class per architecture).

Nothing here imports a heavy library: ``qvq --help`` imports the registry.  GGUF identifiers come from
gguf-py's own constants, imported when they are first asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from qvq_local.errors import ModelError


class Family:
    """One model family.  Subclasses fill the class attributes and implement the methods."""

    #: Registry key and display name (``"Qwen2-VL"``).
    name: ClassVar[str]
    #: Models of the family, for messages (``"QVQ / Qwen2-VL"``).
    models: ClassVar[str]
    #: ``config.json``'s ``architectures`` entries and ``model_type`` values that mean this family.
    hf_architectures: ClassVar[tuple[str, ...]]
    hf_model_types: ClassVar[tuple[str, ...]]
    #: mlx-vlm can run the family's vision tower apart from the prompt (the MLX session encodes once).
    mlx_split_vision: ClassVar[bool] = False

    # ---- What the rest of qvq-local reads; a new family sets every one of these.
    #: Tokenizer: special tokens in id order from ``base_vocab`` (the first special's id).
    special_tokens: ClassVar[tuple[str, ...]]
    base_vocab: ClassVar[int]
    #: One image in a rendered prompt, and the pad token the backends expand per image token.
    image_block: ClassVar[str]
    image_pad: ClassVar[str]
    #: Prompt defaults: system prompt, sampling fallback (temperature, top_p, top_k, repetition_penalty),
    #: and the markers that end the thought in a reply.
    system_prompt: ClassVar[str]
    sampling: ClassVar[dict[str, float | int]]
    answer_markers: ClassVar[tuple[str, ...]]
    #: Image grid: vision patch (px), spatial merge, their product (the resize multiple), the processor's
    #: pixel bounds, and the image-token bounds llama.cpp's mtmd applies to this projector.
    patch_size: ClassVar[int]
    merge_size: ClassVar[int]
    image_factor: ClassVar[int]
    processor_min_pixels: ClassVar[int]
    processor_max_pixels: ClassVar[int]
    llama_image_tokens: ClassVar[tuple[int, int]]
    #: Synthetic checkpoint shapes by name (``qvq synth --shape``).
    synth_shapes: ClassVar[dict[str, Any]]
    #: Tensor-name facts the integrity checks use (widths, the merger's output, the embedding, mmproj out).
    width_tensor_suffixes: ClassVar[tuple[str, ...]]
    merger_out_suffix: ClassVar[str]
    embedding_suffix: ClassVar[str]
    mmproj_out_tensor: ClassVar[str]

    #: Optional whole GGUF converter parts, for a family whose tensor layout the generic converter cannot
    #: express (Qwen3-VL's DeepStack mergers).  None: ``convert/``'s generic builders, which ask the
    #: fine-grained hooks below (``gguf_text_name``/``gguf_text_order``, ``mmproj_tensors``,
    #: ``mmproj_family_keys``).  Signatures: ``gguf_text_plan(ckpt, weight_type)``,
    #: ``gguf_text_metadata(ckpt, vocab, file_type, name)``, ``mmproj_plan(ckpt, weight_type)``,
    #: ``mmproj_metadata(ckpt, file_type, name)``.
    gguf_text_plan: ClassVar[Any] = None
    gguf_text_metadata: ClassVar[Any] = None
    mmproj_plan: ClassVar[Any] = None
    mmproj_metadata: ClassVar[Any] = None

    def dims_from_config(self, config: dict[str, Any], path: Path) -> Any:
        """Typed text and vision dimensions from ``config.json`` (ModelError naming ``path`` if wrong)."""
        raise NotImplementedError

    def merger_width(self, config: dict[str, Any]) -> int | None:
        """The width the vision merger projects into (must equal the text width)."""
        raise NotImplementedError

    def expected_shapes(self, dims: Any) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, by its original HF name, with its shape."""
        raise NotImplementedError

    def normalise_name(self, name: str) -> str:
        """A tensor name in the family's original HF naming (other transformers versions renamed some)."""
        raise NotImplementedError

    def is_vision_tensor(self, name: str) -> bool:
        raise NotImplementedError

    def smart_resize(self, width: int, height: int, **bounds: Any) -> tuple[int, int]:
        """The size the family's processor resizes a ``width`` x ``height`` image to."""
        raise NotImplementedError

    def image_tokens(self, width: int, height: int, **bounds: Any) -> int:
        """Image tokens (after the merge) one image of that size becomes."""
        raise NotImplementedError

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

    # ---- Synthetic checkpoints (``qvq synth --family``; convert/synthetic.py writes what these return)
    #: Lower-case names ``--family`` accepts besides :attr:`name` (``"qwen2-vl"``).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: preprocessor_config.json's ``processor_class``.
    hf_processor_class: ClassVar[str]

    def synth_config(self, shape: Any, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """config.json of a synthetic checkpoint of ``shape`` (``ids``: the special tokens' ids)."""
        raise NotImplementedError

    def synth_tensors(self, shape: Any) -> list[tuple[str, tuple[int, ...], str]]:
        """``(name, shape, init)`` of every tensor, in writing order; init is ``normal`` or ``norm_weight``."""
        raise NotImplementedError

    def synth_preprocessor_config(self, shape: Any) -> dict[str, Any]:
        raise NotImplementedError

    #: Chat-template variants a synthetic checkpoint can carry, the default first (Qwen3-VL: thinking,
    #: instruct); empty: one template.
    synth_variants: ClassVar[tuple[str, ...]] = ()
    #: ``transformers_version`` in the family's published generation_config.json.
    synth_transformers_version: ClassVar[str] = "4.47.0"
    #: A family whose tokenizer and template files differ from Qwen2-VL's (Qwen3-VL: its added tokens and
    #: templates) returns them: ``synth_tokenizer_files(shape, kind, variant) -> {file name: text}``.
    #: None: Qwen2-VL's files with the family's system prompt and processor class.  Either way
    #: convert/synthetic.py writes the checkpoint.
    synth_tokenizer_files: ClassVar[Any] = None

    # ---- GGUF converter (convert/gguf_text.py, convert/gguf_mmproj.py ask these)
    def gguf_text_name(self, name: str) -> str | None:
        """GGUF name of an original text tensor name (None: not a text-model tensor)."""
        raise NotImplementedError

    def gguf_text_order(self, text: Any, has_lm_head: bool) -> list[str]:
        """The text tensors (original names) in the order the GGUF stores them."""
        raise NotImplementedError

    def check_mmproj_supported(self, ckpt: Any) -> None:
        """Raise ModelError for a vision tower llama.cpp's projector for this family cannot run."""
        raise NotImplementedError

    def mmproj_tensors(self, ckpt: Any) -> list[tuple[str, str, Any]]:
        """``(gguf_name, source_name, how)`` for every mmproj tensor, in order.  ``how`` is None (copy),
        ``("frame", t)`` (one time slice of the Conv3d kernel) or ``("rows", k, n)`` (the k-th of n equal
        row blocks, for a fused qkv)."""
        raise NotImplementedError

    def mmproj_family_keys(self, writer: Any, ckpt: Any) -> None:
        """Add the family's own ``clip.*`` keys (the generic ones are written by the converter)."""

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
