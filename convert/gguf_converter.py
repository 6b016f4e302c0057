"""The GGUF converter's per-family classes: their base, and the registry by family name.

As in llama.cpp's own converter, each family has one class, registered under its name with
:func:`register`::

    @register(qwen2vl.FAMILY.name)
    class Qwen2VLConverter(GgufConverter):
        text_layer_map = {...}

        def add_mmproj_keys(self, w, file_type, name, mean, std):
            super().add_mmproj_keys(w, file_type, name, mean, std)  # the generic keys first
            w.add_vision_spatial_merge_size(...)                     # then the family's own

:class:`GgufConverter` is the generic converter: every method writes or lists what all families share, and
a family's subclass overrides what differs, calling ``super()`` first when it adds to it (a subclass of
another family's class, as Qwen2.5-VL's is of Qwen2-VL's, overrides only what differs from that one).
``convert/to_gguf.py`` asks :func:`converter_for` for a checkpoint's class and drives it.  The facts
(dims, tensor names, GGUF identities) stay the family's (``qvq_local.families``); a class here says only
how llama.cpp wants them written.

The built-in families' classes live in ``convert/gguf_<family>.py`` and are imported by name on the first
lookup; a plugin family registers its own class from its plugin function (``QVQ_PLUGINS`` or an entry
point, run when ``qvq_local.families``, which this module imports, is first imported: so any process
that converts sees it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from qvq_local.convert.checkpoint import Checkpoint
from qvq_local.convert.gguf_mmproj import PATCH_FRAME_NAMES, image_norm, plan_mmproj_tensors
from qvq_local.convert.gguf_stream import PlannedTensor
from qvq_local.convert.gguf_text import TextSource, Vocab, add_text_keys, plan_text_tensors

from qvq_local.errors import ModelError
from qvq_local.families import Family

#: Family name -> its converter class (add with :func:`register`; look up with :func:`converter_for`).
CONVERTERS: dict[str, type[GgufConverter]] = {}

#: The modules of the built-in families' converter classes, imported on the first lookup.
_BUILT_IN = ("gguf_qwen2vl", "gguf_qwen2_5vl", "gguf_qwen3vl", "gguf_qwen3vl_moe", "gguf_qwen3_5")


def register(*family_names: str) -> Callable[[type[GgufConverter]], type[GgufConverter]]:
    """Class decorator: register the class as the GGUF converter of the families named."""

    def add(cls: type[GgufConverter]) -> type[GgufConverter]:
        if not (isinstance(cls, type) and issubclass(cls, GgufConverter)):
            raise TypeError(f"register() decorates a GgufConverter subclass, not {cls!r}")
        for name in family_names:
            if CONVERTERS.get(name, cls) is not cls:
                raise ValueError(f"a GGUF converter for {name!r} is already registered")
            CONVERTERS[name] = cls
        return cls

    return add


def converter_class(family: Family, path: Path | None = None) -> type[GgufConverter]:
    """The converter class registered for ``family`` (a ModelError naming ``path`` when there is none)."""
    for module in _BUILT_IN:
        importlib.import_module(f"{__package__}.{module}")
    cls = CONVERTERS.get(family.name)
    if cls is None:
        raise ModelError(f"no GGUF converter is registered for {family.name}", path=path)
    return cls


def converter_for(ckpt: Checkpoint) -> GgufConverter:
    """The registered converter for the checkpoint's family, bound to it."""
    return converter_class(ckpt.family, ckpt.folder)(ckpt)


class GgufConverter:
    """How a checkpoint becomes llama.cpp's GGUF pair: what every family shares, for subclasses to extend."""

    #: Original text layer tensor suffix -> GGUF layer tensor name (llama.cpp's names for the family).
    text_layer_map: ClassVar[dict[str, str]] = {}

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.family = ckpt.family

    # ---- checks: everything here runs before anything is written
    def check_supported(self) -> None:
        """Raise ModelError for a vision tower llama.cpp's projector for this family cannot run.  Every
        Qwen-VL projector in llama.cpp reads two time frames."""
        v, want = self.ckpt.vision, self.family.temporal_patch_size
        if v.temporal_patch_size != want:
            raise ModelError(
                f"vision temporal_patch_size is {v.temporal_patch_size}; llama.cpp's "
                f"{self.family.gguf_projector} supports only {want}",
                path=self.ckpt.folder / "config.json",
            )

    # ---- the text model
    def text_tensor_names(self) -> list[tuple[str | TextSource, str]]:
        """``(checkpoint name or TextSource, GGUF name)`` of every text tensor, in the order the GGUF stores
        them: the embedding, each layer's tensors (:meth:`text_layer_tensors`), the final norm, the output
        head (when the checkpoint has one)."""
        p, text = self.family.text_prefix, self.ckpt.text
        pairs: list[tuple[str | TextSource, str]] = [(p + "embed_tokens.weight", "token_embd.weight")]
        for i in range(text.num_layers):
            pairs += self.text_layer_tensors(i)
        pairs.append((p + "norm.weight", "output_norm.weight"))
        if "lm_head.weight" in self.ckpt:
            pairs.append(("lm_head.weight", "output.weight"))
        return pairs

    def text_layer_tensors(self, layer: int) -> list[tuple[str | TextSource, str]]:
        """Text layer ``layer``'s tensors: :attr:`text_layer_map`, renamed."""
        p = f"{self.family.text_prefix}layers.{layer}."
        return [(p + k, f"blk.{layer}.{g}") for k, g in self.text_layer_map.items()]

    def keep_f32(self, gguf_name: str) -> bool:
        """True for a 2-D text tensor that stays F32 at every quantisation (llama.cpp's converter keeps the
        expert routers, the convolution kernels and the like in F32).  The base: none."""
        return False

    def text_tensor_plan(self, weight_type: str) -> list[PlannedTensor]:
        """The text tensors with their types (``weight_type`` as in :func:`gguf_text.plan_text_tensors`)."""
        return plan_text_tensors(self.ckpt, self.text_tensor_names(), weight_type, self.keep_f32)

    def add_text_keys(self, w: Any, vocab: Vocab, file_type: int, name: str) -> None:
        """Add the text GGUF's key/values to the GGUFWriter ``w``."""
        add_text_keys(w, self.ckpt, vocab, file_type, name)

    def text_metadata(self, vocab: Vocab, file_type: int, name: str) -> Callable[[Any], None]:
        """``set_metadata(writer)`` for the text GGUF (:func:`gguf_stream.write_gguf`)."""
        return lambda w: self.add_text_keys(w, vocab, file_type, name)

    # ---- the mmproj
    def mmproj_tensors(self) -> list[tuple[str, str, Any]]:
        """``(gguf_name, source_name, how)`` of every mmproj tensor, in order (``how`` as in
        :func:`gguf_mmproj.plan_mmproj_tensors`).  The base: the Conv3d patch kernel, split in time."""
        src = self.family.vision_prefix + "patch_embed.proj.weight"
        return [(gname, src, ("frame", t)) for t, gname in enumerate(PATCH_FRAME_NAMES)]

    def mmproj_tensor_type(self, source: str, shape: tuple[int, ...], weight_type: str) -> str:
        """The type of a copied (or row-split) mmproj tensor: norms and biases F32, linear weights
        ``weight_type``, except Q8_0 on widths its 32-element blocks do not divide (F16 then)."""
        if len(shape) == 1:
            return "F32"
        if weight_type == "Q8_0" and shape[-1] % 32:
            return "F16"
        return weight_type

    def mmproj_tensor_plan(self, weight_type: str) -> list[PlannedTensor]:
        """The mmproj tensors with their types (``weight_type``: F32, F16 or Q8_0)."""
        return plan_mmproj_tensors(self.ckpt, self.mmproj_tensors(), weight_type, self.mmproj_tensor_type)

    def mmproj_image_size(self) -> int:
        """``clip.vision.image_size``: the image side the projector is described with."""
        raise NotImplementedError

    def add_mmproj_keys(self, w: Any, file_type: int, name: str, mean: list[float], std: list[float]) -> None:
        """Add the mmproj's key/values to the GGUFWriter ``w`` (``mean``/``std``: the image statistics).
        The base: the file, the projector and the ViT's shape, which every family writes first."""
        v = self.ckpt.vision
        w.add_type("mmproj")
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(self.family.gguf_projector)
        w.add_vision_projection_dim(self.ckpt.text.hidden_size)
        w.add_vision_image_size(self.mmproj_image_size())
        w.add_vision_patch_size(v.patch_size)
        w.add_vision_embedding_length(v.embed_dim)
        w.add_vision_feed_forward_length(v.mlp_dim)
        w.add_vision_block_count(v.depth)
        w.add_vision_head_count(v.num_heads)

    def mmproj_metadata(self, file_type: int, name: str) -> Callable[[Any], None]:
        """``set_metadata(writer)`` for the mmproj; the image statistics are read and checked now, before
        anything is written."""
        mean, std = image_norm(self.ckpt)
        return lambda w: self.add_mmproj_keys(w, file_type, name, mean, std)
