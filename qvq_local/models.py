"""Model references -> local files: paths, names in the cache, hub ids; manifests; downloads.

A user names a model in one of these ways, and :func:`resolve` turns each into a :class:`ResolvedModel`:

* a GGUF file (its ``mmproj`` projector is found beside it, or named by the folder's manifest);
* a converted MLX folder (``config.json`` + safetensors written by mlx-vlm, or with a manifest);
* a Hugging Face checkpoint folder (format ``"hf"``: mlx-vlm loads it directly, ``qvq convert`` reads it);
* a name listed by ``qvq models`` (a folder under ``QVQ_HOME/models``, or a download);
* a short name from :mod:`qvq_local.catalogue` (``qvq``: a known-good repo for this platform);
* a hub reference ``owner/repo`` or ``owner/repo:QUANT``, checked against the hub's naming rules before any
  network, found in or downloaded into huggingface_hub's shared cache by :mod:`qvq_local.hub` (GGUF repos:
  one quantisation and its projector; MLX and full repos: safetensors, JSON and tokenizer files only;
  never pickle weights).  Folders an earlier qvq-local downloaded under ``QVQ_HOME/hub`` still resolve.

Every converted or downloaded folder carries ``qvq-manifest.json`` (:mod:`qvq_local.formats.manifest`);
``qvq models`` and ``qvq ask`` read it.

Heavy imports (huggingface_hub, tqdm, rich) stay inside the functions that need them.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.config import qvq_home
from qvq_local.errors import ModelError
from qvq_local.formats.manifest import (
    MANIFEST_NAME,
    Format,
    normalize_quantization,
    quantization_from_name,
    read_manifest,
)
from qvq_local.formats.names import PICKLE_SUFFIXES, is_mmproj

# What `pull` downloads: weights as safetensors, configs, tokenizer and chat template.  No *.py (remote
# code is never run) and no pickle weights (*.bin, *.pt, ...).
PULL_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]

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
            return normalize_quantization(_mlx_quantization(self.path))
        if self.format == "gguf":
            return quantization_from_name(self.path.name)
        return normalize_quantization(_hf_dtype(self.path))


def resolve(ref: str | os.PathLike, *, download: bool = True, progress: bool = True) -> ResolvedModel:
    """Turn a model reference into local files (see the module docstring for the accepted kinds).

    A hub id that is not yet downloaded is pulled when ``download`` is true, else ``ModelError``.
    """
    text = str(ref).strip()
    if not text:
        raise ModelError("empty model reference", hint="pass a path, a name from `qvq models` or a hub id")
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(path, name=path.name)

    # a name under QVQ_HOME/models
    if "/" not in text and os.sep not in text and text not in (".", ".."):
        candidate = models_dir() / text
        if candidate.exists():
            return _resolve_path(candidate, name=text)
        from qvq_local import catalogue, hub

        if catalogue.lookup(text) is not None:  # a short name: `qvq models --available`
            ref = hub.reference(text)
            assert ref is not None
            return hub.resolve(ref, download=download, progress=progress)

    if _looks_like_path(text):
        raise ModelError("no such file or folder", path=text)

    if "/" in text and text.count("/") == 1:
        from qvq_local import hub

        ref = hub.parse_ref(text)
        if ref is None:
            check_hub_id(text)  # raises: not owner/repo[:QUANT]
            raise ModelError(f"{text!r} is not a valid hub id")
        local = hub_folder(ref.repo_id)  # a download by an earlier qvq-local (QVQ_HOME/hub)
        if ref.quant is None and (local / MANIFEST_NAME).is_file():
            return _resolve_path(local, name=ref.repo_id)
        return hub.resolve(ref, download=download, progress=progress)

    names = [row["name"] for row in list_models()]
    hint = f"local models: {', '.join(names[:8])}" if names else "convert one with `qvq convert` or pull one"
    raise ModelError(f"unknown model {text!r}: not a path, a name from `qvq models` or a hub id", hint=hint)


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "~", os.sep))
        or text.endswith((".gguf", ".safetensors"))
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
    )


def _resolve_path(path: Path, *, name: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError("not a model: expected a .gguf file or a model folder", path=path)
        return _resolve_gguf_file(path, name=name, manifest=read_manifest(path.parent))
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
            return _resolve_gguf_file(model_file, name=name, manifest=manifest)
        _check_safetensors_folder(path)
        return ResolvedModel(name=name, format=fmt, path=path, manifest=manifest)

    ggufs = [p for p in sorted(path.glob("*.gguf")) if not is_mmproj(p)]
    if ggufs:
        if len(ggufs) > 1:
            listed = ", ".join(p.name for p in ggufs)
            raise ModelError(f"several GGUF models here ({listed}): pass one file", path=path)
        return _resolve_gguf_file(ggufs[0], name=name, manifest=None)

    _check_safetensors_folder(path)
    fmt: Format = "mlx" if _is_mlx_folder(path) else "hf"
    return ResolvedModel(name=name, format=fmt, path=path, manifest=None)


def _resolve_gguf_file(model: Path, *, name: str, manifest: dict | None) -> ResolvedModel:
    if is_mmproj(model):
        raise ModelError(
            "this is a vision projector (mmproj), not the model: pass the model .gguf", path=model
        )
    mmproj: Path | None = None
    if manifest and manifest.get("mmproj") and manifest.get("model") in (None, model.name):
        mmproj = model.parent / manifest["mmproj"]
        if not mmproj.is_file():
            raise ModelError(
                f"missing vision projector {manifest['mmproj']} (named by the manifest)", path=model.parent
            )
    else:
        candidates = sorted(p for p in model.parent.glob("*.gguf") if is_mmproj(p))
        if len(candidates) > 1:
            # prefer the projector named after the model (mmproj-<stem>*.gguf)
            stem = model.stem.lower()
            named = [p for p in candidates if stem in p.name.lower()]
            candidates = named if len(named) == 1 else candidates
        if len(candidates) > 1:
            listed = ", ".join(p.name for p in candidates)
            raise ModelError(
                f"several vision projectors beside the model ({listed}): keep one", path=model.parent
            )
        if not candidates:
            raise ModelError(
                "no vision projector (mmproj*.gguf) beside the model",
                path=model,
                hint="qvq convert --to gguf writes both files",
            )
        mmproj = candidates[0]
    return ResolvedModel(name=name, format="gguf", path=model, mmproj=mmproj, manifest=manifest)


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


def _mlx_quantization(path: Path) -> str:
    quant = _read_config(path).get("quantization") or {}
    if quant.get("bits"):
        return f"{quant['bits']}bit-g{quant.get('group_size', 64)}"
    return _hf_dtype(path)


def _hf_dtype(path: Path) -> str:
    try:
        config = _read_config(path)
    except ModelError:
        return "?"
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(str(dtype), str(dtype or "?"))


# ----------------------------------------------------------------------------- list
def list_models() -> list[dict[str, Any]]:
    """Local models: converted ones under ``QVQ_HOME/models``, downloads under ``QVQ_HOME/hub`` (earlier
    versions) and the runnable models in huggingface_hub's cache (source ``hf-cache``).

    Each row: ``name`` (what ``--model`` accepts), ``format``, ``quantization``, ``size`` (bytes),
    ``source``, ``path``.  Unreadable or unfinished folders are skipped (a download without its
    manifest is unfinished: ``qvq pull`` resumes it).
    """
    rows: list[dict[str, Any]] = []
    base = models_dir()
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                continue  # partial outputs and staging folders
            try:
                model = _resolve_path(entry, name=entry.name)
            except ModelError:
                continue
            rows.append(_row(model))
    hubs = hub_dir()
    if hubs.is_dir():
        for entry in sorted(hubs.iterdir()):
            if entry.name.startswith(".") or "--" not in entry.name or not (entry / MANIFEST_NAME).is_file():
                continue
            try:
                manifest = read_manifest(entry) or {}
                name = manifest.get("source") or entry.name.replace("--", "/", 1)
                model = _resolve_path(entry, name=name)
            except ModelError:
                continue
            rows.append(_row(model))
    from qvq_local import hub

    for model in hub.list_cached():
        row = _row(model)
        row["source"] = "hf-cache"
        rows.append(row)
    return rows


def model_family(model: ResolvedModel) -> str | None:
    """The registered family (``Family.name``) of a resolved model, from its files' own words: a folder's
    config.json, a GGUF pair's mmproj projector (families may share a text architecture); None when
    unknown or unreadable."""
    from qvq_local.families import family_for_config, family_for_gguf_arch, family_for_projector

    try:
        if model.format == "gguf":
            from gguf import Keys

            from qvq_local.formats.gguf import read_gguf_metadata

            if model.mmproj is not None:
                keys = {Keys.Clip.PROJECTOR_TYPE}
                projector = read_gguf_metadata(model.mmproj, keys).get(Keys.Clip.PROJECTOR_TYPE)
                family = family_for_projector(projector)
            else:
                arch = read_gguf_metadata(model.path, {Keys.General.ARCHITECTURE}).get(
                    Keys.General.ARCHITECTURE
                )
                family = family_for_gguf_arch(arch)
        else:
            folder = model.path if model.path.is_dir() else model.path.parent
            family = family_for_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, ModelError, ImportError):
        return None
    return family.name if family is not None else None


def _row(model: ResolvedModel) -> dict[str, Any]:
    manifest = model.manifest or {}
    size = manifest.get("total_bytes")
    if size is None:
        from qvq_local.doctor import model_files  # every part of a split GGUF, with its projector

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


# ----------------------------------------------------------------------------- pull
def pull(hub_id: str, progress: bool = True, revision: str | None = None, mmproj: str | None = None) -> Path:
    """Download ``owner/repo[:QUANT]`` or a short name (:mod:`qvq_local.catalogue`) into huggingface_hub's
    shared cache; the model's path there.

    The GGUF text model (first part of a split one) for a GGUF repo, the snapshot folder for an MLX or
    full-precision one.  Files already in the cache are not downloaded again (:mod:`qvq_local.hub` has
    the rules: quantisation and projector choice, disk check, sha256 and GGUF header checks).
    """
    from qvq_local import hub

    ref = hub.reference(hub_id)
    if ref is None:
        raise ModelError(
            f"{hub_id!r} is neither a hub id (owner/repo[:QUANT]) nor a short name",
            hint="`qvq models --available` lists the short names",
        )
    return hub.resolve(ref, download=True, progress=progress, revision=revision, mmproj=mmproj).path


def _hub_call(hub_id: str, fn):
    """Run a huggingface_hub call; its failures become one-line ``ModelError``s."""
    try:
        return fn()
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - network, HTTP, offline mode, disk: all user-facing
        kind = type(err).__name__
        first = (str(err).strip().splitlines() or [""])[0][:200]
        if kind == "GatedRepoError":
            raise ModelError(
                f"{hub_id} is gated: accept its licence on the hub, then set HF_TOKEN (or `hf auth login`)"
            ) from None
        if kind == "RepositoryNotFoundError":
            raise ModelError(
                f"{hub_id}: not found on the hub, or private",
                hint="check the id; for a private or gated repo set HF_TOKEN (or `hf auth login`)",
            ) from None
        if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            raise ModelError(f"{hub_id}: a file in its listing is missing on the hub") from None
        if kind == "RevisionNotFoundError":
            raise ModelError(f"{hub_id}: no such revision") from None
        if kind == "OfflineModeIsEnabled" or "offline" in first.lower():
            raise ModelError(f"{hub_id}: cannot download, offline mode is on (HF_HUB_OFFLINE)") from None
        if isinstance(err, OSError) and getattr(err, "errno", None) == errno.ENOSPC:
            from qvq_local.errors import DiskFull
            from qvq_local.hub import cache_dir

            raise DiskFull(f"no space left while downloading {hub_id}", path=cache_dir()) from None
        raise ModelError(f"{hub_id}: download failed ({kind}: {first})") from None


class _rich_download_progress:
    """Context manager giving a tqdm class that draws huggingface_hub's bars with Rich on stderr."""

    def __init__(self, hub_id: str):
        self.hub_id = hub_id
        self._progress = None

    def __enter__(self):
        import io
        import sys

        from huggingface_hub.utils import tqdm as hf_tqdm
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
        )
        self._progress = progress
        progress.start()
        hub_id = self.hub_id

        class RichTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
            """Keeps tqdm's counting, replaces its drawing with a Rich task."""

            def __init__(self, *args, **kwargs):
                self._task = None
                kwargs["file"] = io.StringIO()
                kwargs.setdefault("disable", False)
                if kwargs.get("disable") is None:
                    kwargs["disable"] = False
                super().__init__(*args, **kwargs)
                if not self.disable:
                    self._task = progress.add_task(
                        f"{hub_id}: {self.desc or ''}".rstrip(": "), total=self.total or None, detail=""
                    )
                    self.display()

            def display(self, msg=None, pos=None):
                task = getattr(self, "_task", None)
                if task is None:
                    return True
                total = self.total or None
                if self.unit == "B":
                    detail = f"{_human(self.n)}" + (f" / {_human(total)}" if total else "")
                else:
                    detail = f"{int(self.n)}" + (f" / {int(total)}" if total else "") + " files"
                progress.update(
                    task,
                    completed=self.n,
                    total=total,
                    detail=detail,
                    description=f"{hub_id}: {self.desc or ''}".rstrip(": "),
                )
                return True

        return RichTqdm

    def __exit__(self, exc_type, exc, tb):
        if self._progress is not None:
            self._progress.stop()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_size(n: float) -> str:
    """Bytes as a short human string (decimal units, like download tools)."""
    return _human(n)
