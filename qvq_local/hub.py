"""Hugging Face hub repos -> files in huggingface_hub's own, shared cache; the resolver's entry point.

:func:`resolve` takes every kind of model reference: the local kinds through
:func:`qvq_local.models.resolve_local`, then a short name from :mod:`qvq_local.catalogue` (the known-good
repo for this platform) or a hub reference, found in the cache or downloaded (:func:`pull` downloads
without loading).  :func:`list_models` lists the local models and the runnable ones in the cache.

``owner/repo`` or ``owner/repo:QUANT`` (case-insensitive: ``Q4_K_M``, ``q8_0``, ``4bit``) names one of:

* a GGUF repo (one file per quantisation, large ones split ``-00001-of-00002.gguf``, plus ``mmproj-*.gguf``
  projectors): only the chosen quantisation's file(s) and one projector are downloaded.  Without a QUANT,
  a repo with one quantisation gives it, one with several gives :data:`DEFAULT_GGUF_QUANT` when it has
  exactly one such model, else the error lists what there is, with sizes.  The projector: ``mmproj=``
  (a file name or a type such as ``f32``), else F16, else the largest (highest precision) one;
* an MLX repo (quantised safetensors written by mlx-vlm) or a full-precision checkpoint: safetensors,
  configs and tokenizer files (:data:`PULL_PATTERNS`; never pickle weights).

The files land in ``HF_HUB_CACHE`` (``HF_HOME/hub``, default ``~/.cache/huggingface/hub``), where every
other tool finds them; nothing is copied.  A reference whose files are already in the cache resolves with
no network call (with ``HF_HUB_OFFLINE=1`` too); without a QUANT, a cached GGUF repo uses the
quantisations that are cached.  Before a download the free disk space is checked against the sizes in the
repo's file list (and a model too big for this machine's memory is said).  The transfers (resumable,
sha256-verified, drawn with Rich) are :mod:`qvq_local.hub_transfer`'s; then GGUF headers are read.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qvq_local import models
from qvq_local.errors import DiskFull, ModelError
from qvq_local.formats.manifest import normalize_quantization, quantization_from_name
from qvq_local.formats.names import PICKLE_SUFFIXES, is_mmproj, split_part
from qvq_local.formats.safetensors import INDEX_NAME
from qvq_local.hub_transfer import (
    RepoFile,
    cache_dir,
    download_file,
    download_snapshot,
    fetch_lfs,
    list_repo,
    offline,
    partial_path,
    progress_bars,
    repo_cache,
)
from qvq_local.models import ResolvedModel, check_hub_id
from qvq_local.units import file_size, memory_size

#: The quantisation chosen in a GGUF repo that holds several, when none is named (llama.cpp's, Ollama's
#: and LM Studio's default too).
DEFAULT_GGUF_QUANT = "Q4_K_M"

Kind = Literal["gguf", "safetensors"]

# What a safetensors repo gives: weights as safetensors, configs, tokenizer and chat template.  No *.py
# (remote code is never run) and no pickle weights (*.bin, *.pt, ...).
PULL_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]

_QUANT_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
# a projector's precision, in order of preference after F16 (then by size)
_MMPROJ_QUANT = re.compile(r"(?:^|[-_.])(f16|bf16|f32|q\d_\w+)(?=[-_.]|$)", re.IGNORECASE)


# ----------------------------------------------------------------------------- references
@dataclass(frozen=True)
class HubRef:
    repo_id: str
    quant: str | None = None  # as the user wrote it; compared case-insensitively

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def parse_ref(text: str) -> HubRef | None:
    """``owner/repo[:QUANT]`` -> :class:`HubRef`; ``None`` when ``text`` has not that shape at all.

    A well-shaped reference with a bad id or quantisation raises ``ModelError`` (before any network).
    """
    text = text.strip()
    repo, sep, quant = text.partition(":")
    if repo.count("/") != 1:
        if sep and "/" in text:
            check_hub_id(text)  # "C:/x" and the like: refused in the hub id's own words
        return None
    if sep and not _QUANT_TEXT.fullmatch(quant):
        raise ModelError(
            f"{text!r}: {quant!r} is not a quantisation name",
            hint="write owner/repo:QUANT, e.g. owner/repo:Q4_K_M or owner/repo:4bit",
        )
    return HubRef(check_hub_id(repo), quant or None)


def reference(text: str) -> HubRef | None:
    """A short name from :mod:`qvq_local.catalogue` (this platform's source) or ``owner/repo[:QUANT]``."""
    from qvq_local import catalogue

    entry = catalogue.lookup(text) if "/" not in text else None
    if entry is not None:
        return parse_ref(entry.source().ref)
    return parse_ref(text)


# ----------------------------------------------------------------------------- repo listings
@dataclass(frozen=True)
class Plan:
    """What to fetch from a repo, and what the model is once fetched."""

    kind: Kind
    files: tuple[RepoFile, ...]
    model: str | None = None  # GGUF: the text model (first split part)
    mmproj: str | None = None  # GGUF: the projector
    quant: str | None = None  # GGUF: normalised quantisation

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def gguf_quant(filename: str) -> str | None:
    """A GGUF file's quantisation from its name (``...-Q4_K_M.gguf``, split parts too), normalised."""
    name = Path(filename).name
    part = split_part(name)
    found = quantization_from_name(part.stem if part else name[: -len(".gguf")])
    return None if found == "?" else found


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def plan(repo_id: str, files: list[RepoFile], quant: str | None = None, mmproj: str | None = None) -> Plan:
    """Choose what to fetch from ``files`` (a repo's listing, or what the cache holds).  Pure: no I/O."""
    ggufs = [f for f in files if _is_gguf(f.path)]
    text_models = [f for f in ggufs if not is_mmproj(f.path)]
    if text_models:
        groups: dict[str, list[RepoFile]] = {}
        for f in text_models:
            groups.setdefault(gguf_quant(f.path) or Path(f.path).stem, []).append(f)

        def listing() -> str:
            return ", ".join(
                f"{q} ({file_size(sum(f.size for f in fs))})" for q, fs in sorted(groups.items())
            )

        if quant:
            wanted = quant.upper()
            chosen = next((q for q in groups if q.upper() == wanted), None)
            if chosen is None:
                raise ModelError(f"{repo_id} has no {quant} quantisation", hint=f"available: {listing()}")
        elif len(groups) == 1:
            chosen = next(iter(groups))
        elif DEFAULT_GGUF_QUANT in groups and _one_model(groups[DEFAULT_GGUF_QUANT]):
            chosen = DEFAULT_GGUF_QUANT
        else:
            raise ModelError(
                f"{repo_id} holds several GGUF models: {listing()}",
                hint=f"name one, e.g. {repo_id}:{next(iter(sorted(groups)))}",
            )
        parts = groups[chosen]
        if not _one_model(parts):
            names = ", ".join(sorted(f.path for f in parts))
            raise ModelError(f"{repo_id}: several {chosen} models ({names}); cannot choose one")
        parts = sorted(parts, key=lambda f: f.path)
        projector = _choose_mmproj(repo_id, [f for f in ggufs if is_mmproj(f.path)], mmproj)
        return Plan(
            kind="gguf",
            files=(*parts, projector),
            model=parts[0].path,
            mmproj=projector.path,
            quant=chosen,
        )

    safetensors = [f for f in files if f.path.endswith(".safetensors")]
    if not safetensors:
        pickles = [f.path for f in files if f.path.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(
                f"{repo_id} has only pickle weights ({', '.join(pickles[:3])}); refused",
                hint="qvq-local loads safetensors and GGUF only, pickle files can run code",
            )
        raise ModelError(f"{repo_id} has no GGUF or safetensors weights")
    if not any(f.path == "config.json" for f in files):
        raise ModelError(f"{repo_id} has no config.json: not a Hugging Face model repository")
    import fnmatch

    wanted = tuple(
        f for f in files if "/" not in f.path and any(fnmatch.fnmatch(f.path, p) for p in PULL_PATTERNS)
    )
    return Plan(kind="safetensors", files=wanted, quant=quant)


def check_folder_quant(repo_id: str, folder: Path, wanted: str) -> None:
    """A safetensors repo has one quantisation (its config.json's): ``owner/repo:4bit`` must name it."""
    config = folder / "config.json"
    actual = normalize_quantization(
        models.mlx_quantization(folder) if config.is_file() else models.hf_dtype(folder)
    )
    low, have = wanted.lower(), actual.lower()
    if have != low and not have.startswith(low + "-"):
        raise ModelError(f"{repo_id} is {actual}, not {wanted}", hint=f"use {repo_id}")


def _one_model(parts: list[RepoFile]) -> bool:
    """One file, or the complete-looking parts of one split model (same stem, same count)."""
    if len(parts) == 1:
        return True
    keys = set()
    for f in parts:
        part = split_part(f.path)
        if part is None:
            return False
        keys.add((str(Path(f.path).parent), part.stem.lower(), part.count))
    return len(keys) == 1


def _split_complete(parts: tuple[RepoFile, ...] | list[RepoFile]) -> bool:
    part = split_part(parts[0].path)
    return part is None or len(parts) == part.count


def _choose_mmproj(repo_id: str, projectors: list[RepoFile], wanted: str | None) -> RepoFile:
    if not projectors:
        raise ModelError(
            f"{repo_id} has no vision projector (mmproj*.gguf)",
            hint="qvq needs the projector to read images; choose a repo that publishes one",
        )

    def kind(f: RepoFile) -> str:
        m = _MMPROJ_QUANT.search(Path(f.path).name[: -len(".gguf")])
        return m.group(1).upper() if m else "?"

    if wanted:
        low = wanted.lower()
        hits = [f for f in projectors if f.path.lower() == low or Path(f.path).name.lower() == low]
        hits = hits or [f for f in projectors if kind(f) == wanted.upper()]
        if len(hits) != 1:
            names = ", ".join(sorted(f.path for f in projectors))
            raise ModelError(f"{repo_id}: no single projector matches {wanted!r}", hint=f"available: {names}")
        return hits[0]
    f16 = [f for f in projectors if kind(f) == "F16"]
    if len(f16) == 1:
        return f16[0]
    return max(projectors, key=lambda f: (f.size, f.path))


# ----------------------------------------------------------------------------- the cache
def _snapshot(repo_id: str, revision: str | None) -> Path | None:
    folder = repo_cache(repo_id)
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    else:
        ref = folder / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None


def cached_files(snapshot: Path) -> list[RepoFile]:
    """The complete files of a cached snapshot (a link whose blob is gone, or is partial, is not one)."""
    out = []
    for p in sorted(snapshot.rglob("*")):
        if p.is_file():  # follows the link: False when the blob is missing
            out.append(RepoFile(p.relative_to(snapshot).as_posix(), p.stat().st_size))
    return out


def _complete(snapshot: Path, chosen: Plan) -> bool:
    if chosen.kind == "gguf":
        parts = [f for f in chosen.files if f.path != chosen.mmproj]
        return _split_complete(parts)
    index = snapshot / INDEX_NAME
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((snapshot / s).is_file() for s in shards)
    return True


def from_cache(
    ref: HubRef, *, revision: str | None = None, mmproj: str | None = None
) -> ResolvedModel | None:
    """The model ``ref`` names, from the cache alone (no network); ``None`` when it is not all there."""
    snap = _snapshot(ref.repo_id, revision)
    if snap is None:
        return None
    try:
        chosen = plan(ref.repo_id, cached_files(snap), ref.quant, mmproj)
    except ModelError:
        return None
    if not _complete(snap, chosen):
        return None
    if chosen.kind == "safetensors" and ref.quant:
        try:
            check_folder_quant(ref.repo_id, snap, ref.quant)
        except ModelError:
            return None
    return _resolved(ref, snap, chosen)


def _resolved(ref: HubRef, snap: Path, chosen: Plan) -> ResolvedModel:
    if chosen.kind == "gguf":
        assert chosen.model and chosen.mmproj
        return ResolvedModel(
            name=f"{ref.repo_id}:{chosen.quant}",
            format="gguf",
            path=snap / chosen.model,
            mmproj=snap / chosen.mmproj,
        )
    return models.resolve_path(snap, name=ref.repo_id)


# ----------------------------------------------------------------------------- resolve and pull
def resolve(
    ref: str | os.PathLike,
    *,
    download: bool = True,
    progress: bool = True,
    mmproj: str | os.PathLike | None = None,
) -> ResolvedModel:
    """Any model reference -> local files: a local one (:func:`qvq_local.models.resolve_local`), else a
    short name (:mod:`qvq_local.catalogue`) or ``owner/repo[:QUANT]`` from the cache, downloading what is
    missing when ``download`` is true (else ``ModelError``).

    ``mmproj``: the vision projector of a GGUF model, a file (any model), or for a hub repo also a file
    name or type there (``f16``, ``f32``, as ``qvq pull --mmproj`` takes it)."""
    given = Path(os.fspath(mmproj)).expanduser() if mmproj is not None else None
    local = models.resolve_local(ref, mmproj=given)  # a local model takes a file only
    if local is not None:
        return local
    projector = _projector_file(mmproj)
    text = str(ref).strip()
    hub_ref = reference(text)
    if hub_ref is not None:
        if projector is not None or mmproj is None:
            found = resolve_ref(hub_ref, download=download, progress=progress)
            return models.with_projector(found, projector)
        return resolve_ref(hub_ref, download=download, progress=progress, mmproj=str(mmproj))
    if text.count("/") == 1:
        check_hub_id(text)  # raises: not owner/repo[:QUANT]
        raise ModelError(f"{text!r} is not a valid hub id")
    raise models.unknown_model(text, [row["name"] for row in list_models()])


def _projector_file(mmproj: str | os.PathLike | None) -> Path | None:
    """``mmproj`` as a file when it names one (it exists, or is written as a path), else None (not given,
    or a projector's name or type in a hub repo)."""
    if mmproj is None:
        return None
    text = os.fspath(mmproj).strip()
    path = Path(text).expanduser()
    looks_like_path = (
        os.sep in text or "/" in text or text.lower().endswith(".gguf") or text.startswith((".", "~"))
    )
    return path if path.exists() or looks_like_path else None


def pull(hub_id: str, progress: bool = True, revision: str | None = None, mmproj: str | None = None) -> Path:
    """Download ``owner/repo[:QUANT]`` or a short name (:mod:`qvq_local.catalogue`) into huggingface_hub's
    shared cache; the model's path there.

    The GGUF text model (first part of a split one) for a GGUF repo, the snapshot folder for an MLX or
    full-precision one.  Files already in the cache are not downloaded again (quantisation and projector
    choice, disk check, sha256 and GGUF header checks: see the module docstring).
    """
    ref = reference(hub_id)
    if ref is None:
        raise ModelError(
            f"{hub_id!r} is neither a hub id (owner/repo[:QUANT]) nor a short name",
            hint="`qvq models --available` lists the short names",
        )
    return resolve_ref(ref, download=True, progress=progress, revision=revision, mmproj=mmproj).path


def resolve_ref(
    ref: HubRef,
    *,
    download: bool = True,
    progress: bool = True,
    revision: str | None = None,
    mmproj: str | None = None,
) -> ResolvedModel:
    """``ref`` -> :class:`qvq_local.models.ResolvedModel` over files in the cache, downloading what is missing.

    A download by an earlier qvq-local under ``QVQ_HOME/hub`` is :func:`qvq_local.models.resolve_local`'s."""
    found = from_cache(ref, revision=revision, mmproj=mmproj)
    if found is not None:
        return found
    if not download:
        raise ModelError(f"{ref} is not downloaded", hint=f"run `qvq pull {ref}`")
    if offline():
        raise ModelError(
            f"{ref} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE to download it",
        )
    return fetch(ref, progress=progress, revision=revision, mmproj=mmproj)


def fetch(
    ref: HubRef, *, progress: bool = True, revision: str | None = None, mmproj: str | None = None
) -> ResolvedModel:
    """List the repo, choose the files, check the disk, download into the cache, verify."""
    commit, files = list_repo(ref.repo_id, revision)
    chosen = plan(ref.repo_id, files, ref.quant, mmproj)
    if chosen.kind == "gguf" and not _split_complete([f for f in chosen.files if f.path != chosen.mmproj]):
        raise ModelError(f"{ref.repo_id}: split model {chosen.model} is missing parts on the hub")

    if chosen.kind == "safetensors" and ref.quant:  # config.json (small) first: it says the quantisation
        config = download_file(ref.repo_id, "config.json", revision or "main")
        check_folder_quant(ref.repo_id, config.parent, ref.quant)
    fit_warning(ref, chosen.size)
    blobs = repo_cache(ref.repo_id) / "blobs"
    fresh = [f for f in chosen.files if not (f.sha256 and (blobs / f.sha256).is_file())]
    have = sum(
        partial_path(blobs, f).stat().st_size for f in fresh if f.sha256 and partial_path(blobs, f).is_file()
    )
    check_disk(sum(f.size for f in fresh) - have, cache_dir())

    with progress_bars(ref.repo_id, progress) as tqdm_class:
        for f in fresh:
            if f.sha256:
                fetch_lfs(ref.repo_id, commit, f, tqdm_class)
        snap = download_snapshot(ref.repo_id, [f.path for f in chosen.files], revision or "main", tqdm_class)
    if chosen.kind == "gguf":
        check_gguf_headers(snap, [f.path for f in chosen.files])
    return _resolved(ref, snap, chosen)


def check_disk(need: int, where: Path) -> None:
    """Refuse a download that cannot fit on the disk holding ``where`` (with 1% + 100 MB to spare)."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    spare = need // 100 + 100_000_000
    if need > 0 and need + spare > free:
        raise DiskFull(
            f"the download needs {file_size(need)} but only {file_size(free)} is free",
            path=where,
            hint="free some space or point HF_HUB_CACHE at a bigger disk",
        )


def fit_warning(ref: HubRef, size: int) -> str | None:
    """One line on stderr when the model cannot fit this machine's memory (the download still goes on:
    it may be meant for another machine).  The fit estimate (:mod:`qvq_local.fit`), from the weights
    alone."""
    import sys

    from qvq_local.fit import OVERHEAD_FIXED, OVERHEAD_FRACTION
    from qvq_local.hardware import memory_bytes

    total, _available = memory_bytes()
    need = size + int(OVERHEAD_FRACTION * size) + OVERHEAD_FIXED
    if total is None or need <= total:
        return None
    line = (
        f"warning: {ref} needs at least {memory_size(need)} of memory to run and this machine has "
        f"{memory_size(total)}: downloading it anyway"
    )
    print(line, file=sys.stderr)
    return line


def check_gguf_headers(snap: Path, paths: list[str]) -> None:
    """Read each GGUF's header (gguf's own tables); a file that is not a whole GGUF is deleted from the
    cache (link and blob: it would fail in llama.cpp with no better message) and the error says so."""
    from qvq_local.formats.gguf import GgufHeaderError, read_whole_gguf

    for path in paths:
        try:
            read_whole_gguf(snap / path)
        except GgufHeaderError as err:
            link = snap / path
            link.resolve().unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            raise ModelError(
                f"{path} from the hub is not a valid GGUF file ({err}); deleted it",
                path=snap,
                hint="the repository's file itself is broken: choose another quantisation or repo",
            ) from None


# ----------------------------------------------------------------------------- listing
def list_models() -> list[dict[str, Any]]:
    """The local models (:func:`qvq_local.models.list_models`), then the runnable models in
    huggingface_hub's cache (source ``hf-cache``): one row each, as ``qvq models`` shows them."""
    rows = models.list_models()
    for model in list_cached():
        row = models.model_row(model)
        row["source"] = "hf-cache"
        rows.append(row)
    return rows


def list_cached() -> list[ResolvedModel]:
    """Runnable models in the cache: one per cached GGUF quantisation (with a projector), one per
    complete safetensors repo.  Folders other tools left half-way are skipped."""
    rows = []
    base = cache_dir()
    if not base.is_dir():
        return rows
    for folder in sorted(base.glob("models--*--*")):
        repo_id = folder.name[len("models--") :].replace("--", "/", 1)
        snap = _snapshot(repo_id, None)
        if snap is None:
            continue
        files = cached_files(snap)
        quants = sorted(
            {
                q
                for f in files
                if _is_gguf(f.path) and not is_mmproj(f.path)
                for q in [gguf_quant(f.path)]
                if q
            }
        )
        candidates = [HubRef(repo_id, q) for q in quants] if quants else [HubRef(repo_id)]
        for ref in candidates:
            try:
                found = from_cache(ref)
            except ModelError:
                found = None
            if found is not None and _runnable(found):
                rows.append(found)
    return rows


def _runnable(model: ResolvedModel) -> bool:
    """A model of a family this project runs (the cache also holds other tools' models)."""
    from qvq_local import families

    try:
        if model.format == "gguf":
            from gguf import Keys

            from qvq_local.formats.gguf import read_gguf_header

            key = Keys.General.ARCHITECTURE
            arch = read_gguf_header(model.path, wanted={key}, tensors=False).fields
            return families.family_for_gguf_arch(arch.get(key)) is not None
        import json

        config = json.loads((model.path / "config.json").read_text(encoding="utf-8"))
        return families.family_for_config(config) is not None
    except (OSError, ValueError):
        return False
