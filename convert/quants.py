"""The quantisations ``qvq convert`` offers, written once: the GGUF text and projector types, the MLX bits
and group sizes, their defaults, and the words ``qvq convert --help`` shows for them.

The pipeline's option checks (:mod:`qvq_local.convert.pipeline`), the converters (``to_gguf``,
``gguf_quantize``, ``to_mlx``), ``qvq bench``'s conversions and the command line's help all read this
module.  The numbers llama.cpp and GGUF files use for the types are gguf-py's
(:func:`qvq_local.formats.gguf.file_type_value`), not a copy.  Importing it is cheap: ``qvq --help`` builds
its help from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class GgufType:
    """One GGUF type ``qvq convert`` writes."""

    #: what ``--quant`` / ``--mmproj-quant`` take
    name: str
    #: llama.cpp's name: the file type (``general.file_type``), the tensor type of the types written
    #: directly, and the tag in the output's file names (``model-Q4_K_M.gguf``)
    label: str
    #: roughly, after quantisation: for the disk-space check and the progress bar
    bits_per_weight: float
    #: written by the project's own GGUF writer; the others are made by llama.cpp's quantiser
    direct: bool = False


#: Every GGUF type the converter writes, by the name the options take.
GGUF_TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        GgufType("q4_k_m", "Q4_K_M", 4.9),
        GgufType("q5_k_m", "Q5_K_M", 5.7),
        GgufType("q8_0", "Q8_0", 8.5),
        GgufType("f16", "F16", 16.0, direct=True),
        GgufType("f32", "F32", 32.0, direct=True),
    )
}
#: ``--quant``: the text model's types, in the order ``--help`` lists them.
GGUF_QUANTS: tuple[str, ...] = ("q4_k_m", "q5_k_m", "q8_0", "f16", "f32")
DEFAULT_GGUF_QUANT = "q4_k_m"
#: ``--mmproj-quant``: the vision projector's types (every one written by the project's writer).
MMPROJ_QUANTS: tuple[str, ...] = ("f16", "q8_0", "f32")
DEFAULT_MMPROJ_QUANT = "f16"
#: What ``--help`` says of a projector type (measured: tests/test_convert_gguf.py's parity bounds).
MMPROJ_NOTES: Mapping[str, str] = {
    "f16": "image embeddings match transformers to ~0.1%",
    "q8_0": "half the size, ~2% off; not faster in our CPU runs",
}

#: ``--bits``: the MLX language model's affine quantisation (the vision tower is never quantised).
MLX_BITS: tuple[int, ...] = (4, 8)
DEFAULT_BITS = 4
#: ``--bits none`` (and the words for it): the source dtype is kept.
NO_BITS = "none"
#: ``--group-size``: weights sharing one scale and bias.
MLX_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64


def listed(values: Iterable[object], default: object = None, notes: Mapping[str, str] | None = None) -> str:
    """``"q4_k_m (default) | q5_k_m | f16 (its note)"``: the choices as ``--help`` writes them."""
    notes = notes or {}
    out = []
    for value in values:
        said = [
            *(["default"] if value == default else []),
            *([notes[str(value)]] if str(value) in notes else []),
        ]
        out.append(f"{value} ({'; '.join(said)})" if said else str(value))
    return " | ".join(out)


def quant_help() -> str:
    return f"GGUF only: {listed(GGUF_QUANTS, DEFAULT_GGUF_QUANT)}."


def mmproj_quant_help() -> str:
    return f"GGUF only: the vision projector's type, {listed(MMPROJ_QUANTS, DEFAULT_MMPROJ_QUANT, MMPROJ_NOTES)}."


def bits_help() -> str:
    return f"MLX only: {listed((*MLX_BITS, NO_BITS), DEFAULT_BITS, {NO_BITS: 'keep the source dtype'})}."


def group_size_help() -> str:
    return f"MLX only: quantisation group size, {listed(MLX_GROUP_SIZES, DEFAULT_GROUP_SIZE)}."


__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_GGUF_QUANT",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_MMPROJ_QUANT",
    "GGUF_QUANTS",
    "GGUF_TYPES",
    "MLX_BITS",
    "MLX_GROUP_SIZES",
    "MMPROJ_QUANTS",
    "GgufType",
    "bits_help",
    "group_size_help",
    "listed",
    "mmproj_quant_help",
    "quant_help",
]
