"""Model references -> local files: paths, names under ``QVQ_HOME/models``, earlier downloads; the list.

A user names a model in one of these ways; :func:`resolve_local` turns the local kinds into a
:class:`ResolvedModel`:

* a GGUF file (its ``mmproj`` projector is found beside it, or named by the folder's manifest);
* a converted MLX folder (``config.json`` + safetensors written by mlx-vlm, or with a manifest);
* a Hugging Face checkpoint folder (format ``"hf"``: mlx-vlm loads it directly, ``qvq convert`` reads it);
* a name listed by ``qvq models`` (a folder under ``QVQ_HOME/models``);
* a hub id ``owner/repo`` an earlier qvq-local downloaded under ``QVQ_HOME/hub``.

Short names (:mod:`qvq_local.catalogue`) and hub references (``owner/repo[:QUANT]``, found in or
downloaded into huggingface_hub's shared cache) are :mod:`qvq_local.hub`'s, which sits above this module:
:func:`qvq_local.hub.resolve` is the entry point that takes every kind, asking here first.

Every converted or downloaded folder carries ``qvq-manifest.json`` (:mod:`qvq_local.formats.manifest`);
``qvq models`` and ``qvq ask`` read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.config import qvq_home
from qvq_local.errors import InputError, ModelError
from qvq_local.formats.manifest import (
    MANIFEST_NAME,
    Format,
    normalize_quantization,
    quantization_from_name,
    read_manifest,
)
from qvq_local.formats.names import PICKLE_SUFFIXES, is_mmproj, split_parts

# Hugging Face repo id rules: owner/name, each [A-Za-z0-9._-], no leading/trailing '-' or '.', no '--'/'..'.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


# ----------------------------------------------------------------------------- places
def models_dir() -> Path:
    """Where ``qvq convert`` writes by default: ``QVQ_HOME/models``."""
    return qvq_home() / "models"


def hub_dir() -> Path:
    """Where earlier versions of ``qvq pull`` downloaded to (``QVQ_HOME/hub/<owner>--<name>``); still read.

    Downloads now go into huggingface_hub's shared cache (:mod:`qvq_local.hub`)."""
    return qvq_home() / "hub"


def hub_folder(hub_id: str) -> Path:
    owner, name = check_hub_id(hub_id).split("/")
    return hub_dir() / f"{owner}--{name}"


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.fullmatch(ref)) and "--" not in ref and ".." not in ref


def check_hub_id(ref: str) -> str:
    """Return ``ref`` when it is a well-formed ``owner/name`` hub id, else raise ``ModelError``."""
    if not is_hub_id(ref):
        raise ModelError(
            f"{ref!r} is not a valid hub id",
            hint="hub ids look like owner/name, e.g. Qwen/QVQ-72B-Preview; `qvq models` lists local names",
        )
    return ref


# ----------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to local files.

    ``path`` is the folder for ``mlx``/``hf`` and the text-model ``.gguf`` file for ``gguf``;
    ``mmproj`` is the GGUF vision projector (``None`` for the other formats).
    """

    name: str
    format: Format
    path: Path
    mmproj: Path | None = None
    manifest: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def quantization(self) -> str:
        """Normalised (:func:`normalize_quantization`): ``Q4_K_M``, ``4bit-g64``, ``BF16``."""
        if self.manifest and self.manifest.get("quantization"):
            return normalize_quantization(str(self.manifest["quantization"]))
        if self.format == "mlx":
            return normalize_quantization(mlx_quantization(self.path))
        if self.format == "gguf":
            return quantization_from_name(self.path.name)
        return normalize_quantization(hf_dtype(self.path))


def model_files(model: ResolvedModel) -> list[Path]:
    """The files a model loads: the GGUF pair (every part of a split text model: llama.cpp loads them
    all), or a folder's safetensors."""
    if model.format == "gguf":
        return [p for p in (*split_parts(model.path), model.mmproj) if p is not None]
    return sorted(Path(model.path).glob("*.safetensors"))


def resolve_local(ref: str | os.PathLike, *, mmproj: Path | None = None) -> ResolvedModel | None:
    """A model reference of a local kind (see the module docstring) -> its files; ``None`` when ``ref`` is
    not one (a short name or a hub reference: :func:`qvq_local.hub.resolve` takes those).

    ``mmproj``: a vision projector file to use with a GGUF model instead of the one beside it
    (:func:`check_projector`).  Raises ``ModelError`` for an empty reference, a path that does not exist or
    is not a model.
    """
    text = str(ref).strip()
    if not text:
        raise ModelError("empty model reference", hint="pass a path, a name from `qvq models` or a hub id")
    path = Path(text).expanduser()
    if path.exists():
        return resolve_path(path, name=path.name, mmproj=mmproj)

    # a name under QVQ_HOME/models
    if "/" not in text and os.sep not in text and text not in (".", ".."):
        candidate = models_dir() / text
        if candidate.exists():
            return resolve_path(candidate, name=text, mmproj=mmproj)

    if _looks_like_path(text):
        raise ModelError("no such file or folder", path=text)

    # a download by an earlier qvq-local (QVQ_HOME/hub/<owner>--<name>, complete when it has a manifest)
    if is_hub_id(text) and (hub_folder(text) / MANIFEST_NAME).is_file():
        return resolve_path(hub_folder(text), name=text, mmproj=mmproj)
    return None


def check_projector(path: str | os.PathLike) -> Path:
    """A vision projector file given by the user (``--mmproj``): it must exist and be a GGUF file (that it
    is a projector of this model's family is checked when the backend loads it)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("no such vision projector file", path=p)
    if not p.is_file():
        raise InputError("the vision projector must be a .gguf file, this is a folder", path=p)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise InputError(f"cannot read the vision projector ({err.strerror or err})", path=p) from None
    if magic != b"GGUF":
        raise InputError("not a GGUF file: a vision projector is an mmproj .gguf", path=p)
    return p


def with_projector(model: ResolvedModel, mmproj: Path | None) -> ResolvedModel:
    """``model`` with the vision projector ``mmproj`` (checked) in place of its own; ``mmproj`` None leaves it
    as it is.  Only a GGUF model has a separate projector: for any other an InputError says so."""
    if mmproj is None:
        return model
    if model.format != "gguf":
        raise InputError(
            f"a separate vision projector (--mmproj) goes with a GGUF model; this model is {model.format}",
            path=model.path,
        )
    return dataclasses.replace(model, mmproj=check_projector(mmproj))


def unknown_model(text: str, names: list[str]) -> ModelError:
    """The error for a reference that is no local model, short name or hub id; ``names``: the local ones."""
    hint = f"local models: {', '.join(names[:8])}" if names else "convert one with `qvq convert` or pull one"
    return ModelError(f"unknown model {text!r}: not a path, a name from `qvq models` or a hub id", hint=hint)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "~", os.sep))
        or text.endswith((".gguf", ".safetensors"))
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
    )


def resolve_path(path: Path, *, name: str, mmproj: Path | None = None) -> ResolvedModel:
    """A model file or folder on disk -> its files, read from its manifest or from what the folder holds
    (``mmproj``: a projector file to use instead: :func:`with_projector`)."""
    if mmproj is not None:
        return with_projector(_resolve_path(path, name=name, projector=False), mmproj)
    return _resolve_path(path, name=name)


def _resolve_path(path: Path, *, name: str, projector: bool = True) -> ResolvedModel:
    """:func:`resolve_path`; ``projector=False``: a GGUF model's own projector is not looked for."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError("not a model: expected a .gguf file or a model folder", path=path)
        return _resolve_gguf_file(path, name=name, manifest=read_manifest(path.parent), projector=projector)
    if not path.is_dir():
        raise ModelError("not a file or folder", path=path)

    manifest = read_manifest(path)
    if manifest is not None:
        fmt = manifest["format"]
        if fmt == "gguf":
            model_name = manifest.get("model")
            if not model_name:
                raise ModelError("GGUF manifest names no model file", path=path / MANIFEST_NAME)
            model_file = path / model_name
            if not model_file.is_file():
                raise ModelError(f"missing {model_name} (named by the manifest)", path=path)
            return _resolve_gguf_file(model_file, name=name, manifest=manifest, projector=projector)
        _check_safetensors_folder(path)
        return ResolvedModel(name=name, format=fmt, path=path, manifest=manifest)

    ggufs = [p for p in sorted(path.glob("*.gguf")) if not is_mmproj(p)]
    if ggufs:
        if len(ggufs) > 1:
            listed = ", ".join(p.name for p in ggufs)
            raise ModelError(f"several GGUF models here ({listed}): pass one file", path=path)
        return _resolve_gguf_file(ggufs[0], name=name, manifest=None, projector=projector)

    _check_safetensors_folder(path)
    fmt: Format = "mlx" if _is_mlx_folder(path) else "hf"
    return ResolvedModel(name=name, format=fmt, path=path, manifest=None)


def _resolve_gguf_file(
    model: Path, *, name: str, manifest: dict | None, projector: bool = True
) -> ResolvedModel:
    """A GGUF model file and its projector (``projector=False``: not looked for, one is given instead)."""
    if is_mmproj(model):
        raise ModelError(
            "this is a vision projector (mmproj), not the model: pass the model .gguf", path=model
        )
    mmproj = _projector_of(model, manifest) if projector else None
    return ResolvedModel(name=name, format="gguf", path=model, mmproj=mmproj, manifest=manifest)


def _projector_of(model: Path, manifest: dict | None) -> Path:
    """The vision projector of a GGUF model: the one its manifest names, else the one beside it."""
    if manifest and manifest.get("mmproj") and manifest.get("model") in (None, model.name):
        mmproj = model.parent / manifest["mmproj"]
        if not mmproj.is_file():
            raise ModelError(
                f"missing vision projector {manifest['mmproj']} (named by the manifest)", path=model.parent
            )
        return mmproj
    candidates = sorted(p for p in model.parent.glob("*.gguf") if is_mmproj(p))
    if len(candidates) > 1:
        # prefer the projector named after the model (mmproj-<stem>*.gguf)
        stem = model.stem.lower()
        named = [p for p in candidates if stem in p.name.lower()]
        candidates = named if len(named) == 1 else candidates
    if len(candidates) > 1:
        listed = ", ".join(p.name for p in candidates)
        raise ModelError(
            f"several vision projectors beside the model ({listed}): keep one, or name it with --mmproj",
            path=model.parent,
        )
    if not candidates:
        if _is_projector(model):  # a projector by its header, under another name
            raise ModelError(
                "this is a vision projector (its GGUF architecture says so), not the model: pass the model"
                " .gguf, and this file with --mmproj",
                path=model,
            )
        raise ModelError(
            "no vision projector (mmproj*.gguf) beside the model",
            path=model,
            hint="qvq convert --to gguf writes both files; --mmproj FILE names one",
        )
    return candidates[0]


def _is_projector(path: Path) -> bool:
    """The GGUF file's architecture is the vision projector's (gguf's MMPROJ); False when unreadable."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

    from qvq_local.formats.gguf import read_gguf_metadata

    try:
        arch = read_gguf_metadata(path, {Keys.General.ARCHITECTURE}).get(Keys.General.ARCHITECTURE)
    except ModelError:
        return False
    return arch == MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]


def _check_safetensors_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelError("not a model folder: no config.json (and no .gguf file)", path=path)
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = "pickle weights are never loaded" if pickles else None
        raise ModelError("no *.safetensors weights", path=path, hint=hint)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"unreadable config.json ({err})", path=path) from None


def _is_mlx_folder(path: Path) -> bool:
    """mlx-vlm's output: quantisation info in the config, or ``format: mlx`` in the safetensors metadata."""
    config = _read_config(path)
    if "quantization" in config:
        return True
    from qvq_local.formats.safetensors import SafetensorsFile

    shard, _problems = SafetensorsFile.inspect(min(path.glob("*.safetensors")))
    if shard is None:  # a broken shard is qvq doctor's to report; it is not MLX's mark
        return False
    shard.close()
    return shard.metadata.get("format") == "mlx"


def mlx_quantization(path: Path) -> str:
    """An MLX folder's quantization from its config.json (``4bit-g64``), else its weights' dtype."""
    quant = _read_config(path).get("quantization") or {}
    if quant.get("bits"):
        return f"{quant['bits']}bit-g{quant.get('group_size', 64)}"
    return hf_dtype(path)


def hf_dtype(path: Path) -> str:
    """A checkpoint folder's weight dtype from its config.json (``bf16``, ``f16``, ``f32``); ``?`` unknown."""
    try:
        config = _read_config(path)
    except ModelError:
        return "?"
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(str(dtype), str(dtype or "?"))


# ----------------------------------------------------------------------------- list
def list_models() -> list[dict[str, Any]]:
    """Local models: converted ones under ``QVQ_HOME/models`` and downloads under ``QVQ_HOME/hub`` (earlier
    versions); :func:`qvq_local.hub.list_models` adds the runnable models in huggingface_hub's cache.

    Each row (:func:`model_row`): ``name`` (what ``--model`` accepts), ``format``, ``quantization``,
    ``size`` (bytes), ``source``, ``path``.  Unreadable or unfinished folders are skipped (a download
    without its manifest is unfinished: ``qvq pull`` resumes it).
    """
    rows: list[dict[str, Any]] = []
    base = models_dir()
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                continue  # partial outputs and staging folders
            try:
                model = resolve_path(entry, name=entry.name)
            except ModelError:
                continue
            rows.append(model_row(model))
    hubs = hub_dir()
    if hubs.is_dir():
        for entry in sorted(hubs.iterdir()):
            if entry.name.startswith(".") or "--" not in entry.name or not (entry / MANIFEST_NAME).is_file():
                continue
            try:
                manifest = read_manifest(entry) or {}
                name = manifest.get("source") or entry.name.replace("--", "/", 1)
                model = resolve_path(entry, name=name)
            except ModelError:
                continue
            rows.append(model_row(model))
    return rows


def model_family(model: ResolvedModel) -> str | None:
    """The registered family (``Family.name``) of a resolved model, from its files' own words: a folder's
    config.json, a GGUF pair's text architecture and projector (families share one or the other); None
    when unknown or unreadable."""
    from qvq_local.families import family_for_config, family_for_gguf_arch, family_for_gguf_pair

    try:
        if model.format == "gguf":
            from gguf import Keys

            from qvq_local.formats.gguf import read_gguf_metadata

            arch = read_gguf_metadata(model.path, {Keys.General.ARCHITECTURE}).get(Keys.General.ARCHITECTURE)
            if model.mmproj is not None:
                keys = {Keys.Clip.PROJECTOR_TYPE}
                projector = read_gguf_metadata(model.mmproj, keys).get(Keys.Clip.PROJECTOR_TYPE)
                family = family_for_gguf_pair(arch, projector)
            else:
                family = family_for_gguf_arch(arch)
        else:
            folder = model.path if model.path.is_dir() else model.path.parent
            family = family_for_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, ModelError, ImportError):
        return None
    return family.name if family is not None else None


def model_row(model: ResolvedModel) -> dict[str, Any]:
    """One row of ``qvq models`` for a resolved model (size: the manifest's, else the files')."""
    manifest = model.manifest or {}
    size = manifest.get("total_bytes")
    if size is None:
        size = sum(p.stat().st_size for p in model_files(model) if p.exists())
    return {
        "name": model.name,
        "family": model_family(model),
        "format": model.format,
        "quantization": model.quantization,
        "size": int(size),
        "source": manifest.get("source", ""),
        "path": str(model.path),
    }
