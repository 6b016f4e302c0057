"""What a model file's name says, written once: a GGUF vision projector, a part of a split GGUF, a pickle
checkpoint.

These are naming conventions, not contents.  llama.cpp's converters name a vision projector
``mmproj-*.gguf``; ``gguf-split`` names the parts of a large model ``<stem>-00001-of-00003.gguf`` (and
llama.cpp loads every part when given the first); PyTorch's pickle checkpoints end in one of
:data:`PICKLE_SUFFIXES` and are never opened here (unpickling can run code).  The resolver, the hub
planner, the converter's checkpoint reader, the fit estimate and the integrity checks all ask here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Pickle checkpoints (PyTorch ``.bin``/``.pt``/``.pth``, Lightning ``.ckpt``, plain pickles): refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def is_mmproj(path: str | os.PathLike) -> bool:
    """A GGUF vision projector by its name (``mmproj*``, any case), not the text model."""
    return Path(path).name.lower().startswith("mmproj")


@dataclass(frozen=True)
class SplitPart:
    """One part of a split GGUF: ``<stem>-<index>-of-<count>.gguf``, counted from 1."""

    stem: str
    index: int
    count: int


def split_part(path: str | os.PathLike) -> SplitPart | None:
    """The split-part fields of a file name; ``None`` when the file is not a part of a split GGUF."""
    m = _SPLIT.match(Path(path).name)
    return SplitPart(m.group("stem"), int(m.group("i")), int(m.group("n"))) if m else None


def split_part_name(stem: str, index: int, count: int) -> str:
    """The file name of part ``index`` (from 1) of ``count`` of a split GGUF named ``stem``."""
    return f"{stem}-{index:05d}-of-{count:05d}.gguf"


def split_parts(path: Path) -> list[Path]:
    """Every part beside ``path`` of the split GGUF it belongs to, in order; ``[path]`` when not split."""
    part = split_part(path)
    if part is None:
        return [path]
    return sorted(path.parent.glob(f"{part.stem}-*-of-{part.count:05d}.gguf"))


__all__ = ["PICKLE_SUFFIXES", "SplitPart", "is_mmproj", "split_part", "split_part_name", "split_parts"]
