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
