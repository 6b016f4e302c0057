"""``qvq-manifest.json``, the record every converted or downloaded model folder carries, and the one spelling
of a quantization.

The manifest says where a model came from (``source``), its ``format`` (``mlx``, ``gguf`` or ``hf``), its
``quantization``, the size of every file, the tool version and the creation time (and for a GGUF pair the
``model`` and ``mmproj`` file names).  It is written last and atomically (:mod:`qvq_local.atomic`), so a
folder with a manifest is a complete one; ``qvq models``, ``qvq ask`` and ``qvq doctor`` read it through
:func:`read_manifest`.

A quantization is spelled one way everywhere (API, JSON outputs, manifest): :func:`normalize_quantization`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from qvq_local import atomic
from qvq_local.errors import ModelError

MANIFEST_NAME = "qvq-manifest.json"
MANIFEST_SCHEMA = 1

#: The model formats a manifest (and the resolver) knows.
Format = Literal["mlx", "gguf", "hf"]
FORMATS: tuple[Format, ...] = ("mlx", "gguf", "hf")


# ----------------------------------------------------------------------------- quantization
#: Float weight types: upper case, as llama.cpp names a GGUF's file type (F32, F16, BF16).
_FLOAT_NAMES = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "bf16": "BF16",
    "f16": "F16",
    "f32": "F32",
}
#: A GGUF file's quantisation in its name, as llama.cpp's tools and the hub's repos write it.
_QUANT_IN_NAME = re.compile(r"(q\d_k_[msl]|q\d_k|q\d_\d|iq\d_\w+|f16|f32|bf16)")


def normalize_quantization(value: str) -> str:
    """The one spelling of a quantization everywhere (API, JSON outputs, manifest).

    GGUF types and float weights as llama.cpp names them, upper case (``Q4_K_M``, ``Q8_0``, ``IQ4_XS``,
    ``F16``, ``BF16``); MLX's affine quantization as ``<bits>bit-g<group>`` (``4bit-g64``); ``?`` unknown.
    """
    text = str(value or "").strip()
    if not text or text == "?":
        return "?"
    low = text.lower()
    if low in _FLOAT_NAMES:
        return _FLOAT_NAMES[low]
    if re.fullmatch(r"\d+bit(-g\d+)?(-\w+)?", low):
        return low
    if re.fullmatch(r"i?q\d\w*|tq\d_\d|mxfp4\w*", low):
        return text.upper()
    return text


def quantization_from_name(filename: str) -> str:
    """A GGUF file's quantization from its name (``...-Q4_K_M.gguf``), normalised; ``?`` when it says none."""
    match = _QUANT_IN_NAME.search(filename.lower())
    return normalize_quantization(match.group(1)) if match else "?"


# ----------------------------------------------------------------------------- manifest
def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a model folder (or of the folder holding a model file); ``None`` when absent.

    Raises ``ModelError`` naming the manifest when it is unreadable or has no valid ``format``.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"unreadable manifest ({err})", path=manifest_path) from None
    if not isinstance(data, dict) or data.get("format") not in FORMATS:
        raise ModelError("manifest has no valid 'format'", path=manifest_path)
    # manifests written before the spelling was settled say "quantisation" ("q4_k_m")
    old = data.pop("quantisation", None)
    if data.get("quantization") or old:
        data["quantization"] = normalize_quantization(str(data.get("quantization") or old))
    return data


def write_manifest(folder: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as the folder's manifest atomically (temporary file, then ``os.replace``)."""
    folder = Path(folder)
    target = folder / MANIFEST_NAME
    return atomic.write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("qvq-local")
    except Exception:  # noqa: BLE001 - not installed as a distribution (running from a source tree)
        return "0+unknown"


def build_manifest(
    folder: str | os.PathLike,
    *,
    source: str,
    format: Format,
    quantization: str,
    model_file: str | None = None,
    mmproj_file: str | None = None,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """A manifest for the finished ``folder``: sizes are measured from the files on disk.

    ``name`` is the model's final folder name (the folder may still be a hidden partial one).
    """
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not _is_hidden(p.relative_to(folder))
    }
    data: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "name": name or folder.name,
        "source": source,
        "format": format,
        "quantization": normalize_quantization(quantization),
        "files": files,
        "total_bytes": sum(files.values()),
        "tool": "qvq-local",
        "tool_version": tool_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model_file:
        data["model"] = model_file
    if mmproj_file:
        data["mmproj"] = mmproj_file
    if extra:
        data.update(extra)
    return data


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)
