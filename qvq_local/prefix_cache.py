"""Pay for an image once: keep the KV state after the system prompt and the image(s), reuse it when the
next question shares that prefix.

QVQ is single-turn, so people ask again about the same image, and each ask used to pay the whole image
encode and prefill again.  A backend with the registry's ``prefix_state`` capability exports that state
(``session.prefill(prompt, keep_prefix=True)`` -> ``session.prefix_state``) and restores it
(``session.prefill(prompt, prefix=state)``); this module is the policy around that mechanism, in one place:

* :func:`prefix_key` -- what must match for a state to be reused: the model files' identity (path, size,
  mtime), the backend and its library version, the prompt text up to the last image (system prompt and
  template included), the chat template, each image's bounded pixels and the pixel bound;
* :class:`MemoryCache` -- an LRU of states capped in bytes, for one process (``Model.ask`` calls, and
  ``qvq serve``: thread-safe);
* :class:`DiskCache` -- one safetensors file per state under ``QVQ_HOME/cache`` for the CLI, capped in
  bytes (oldest used first out), written atomically, each file checked (format, key, checksum of its data)
  before use: a corrupt, truncated or mismatched file is ignored with a one-line notice and rebuilt;
* :func:`prefill` -- try memory, then disk, else a fresh prefill that keeps its prefix.

A restored state gives the same next-token logits as a fresh prefill (tests/test_prefix_state.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.errors import InputError
from qvq_local.units import file_size

#: Default caps.  A QVQ-72B prefix (1,300 tokens, f16 KV) is ~0.4 GB; the 2B shape's is ~10 MB.  The disk
#: cap counts files, in decimal units as ``qvq cache info`` shows them (:func:`qvq_local.units.file_size`):
#: 4 GB, and ``cache_max_mb`` N means N * 1,000,000 bytes.
DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_DISK_BYTES = 4 * 10**9
MB = 10**6
#: Bumped when the file layout or what a state holds changes: older files then no longer match.
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_META_KEY = "qvq_prefix"


class CacheFileError(Exception):
    """A cache file that cannot be trusted (message: what is wrong with it)."""


# ---------------------------------------------------------------- the key


def model_identity(*paths: str | os.PathLike | None) -> list:
    """[path, size, mtime_ns] of every file that makes up the model (a folder: its weights and configs)."""
    out = []
    for p in paths:
        if p is None:
            continue
        p = Path(p).expanduser().resolve()
        files = (
            sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json", ".gguf"))
            if p.is_dir()
            else [p]
        )
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def library_version(backend: str) -> str:
    """The backend's library versions (a state is the library's own layout)."""
    from importlib import metadata

    from qvq_local.backends import registry

    try:
        dists = registry.get(backend).distributions
    except InputError:
        return ""
    versions = []
    for dist in dists:
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=?")
    return ",".join(versions)


def prefix_text(text: str, image_block: str, images: int | None = None) -> str:
    """The prompt text up to and including its last image block ("" when it has none), or its
    ``images``-th block (an earlier turn's last image, in a conversation)."""
    if images is None:
        end = text.rfind(image_block)
        return "" if end < 0 else text[: end + len(image_block)]
    end = -len(image_block)
    for _ in range(images):
        end = text.find(image_block, end + len(image_block))
        if end < 0:
            return ""
    return text[: end + len(image_block)] if images > 0 else ""


def image_digest(image: Any) -> str:
    """sha256 of an image's bounded pixels (mode, size and bytes): what the model is shown."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def prefix_key(
    *,
    model: list,
    backend: str,
    prefix: str,
    template: str | None,
    images: list,
    max_pixels: int | None,
    extra: dict | None = None,
) -> str:
    """The cache key: a sha256 over everything a prefix's KV state depends on."""
    fields = {
        "version": FORMAT_VERSION,
        "model": model,
        "backend": backend,
        "library": library_version(backend),
        "prefix": prefix,
        "template": hashlib.sha256((template or "").encode()).hexdigest(),
        "images": [image_digest(img) for img in images],
        "max_pixels": max_pixels,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- in memory


class MemoryCache:
    """Prefix states by key, least recently used out first, at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str):
        with self._lock:
            state = self._items.get(key)
            if state is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: str, state: Any) -> bool:
        """Keep ``state``; evict the least recently used until the total fits.  False when it alone is
        larger than the cap (then nothing is kept)."""
        if state.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._items[key] = state
            self._items.move_to_end(key)
            total = sum(s.nbytes for s in self._items.values())
            while total > self.max_bytes:
                _, old = self._items.popitem(last=False)
                total -= old.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# ---------------------------------------------------------------- on disk

# numpy dtype name <-> safetensors dtype
_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "uint8": "U8",
    "uint16": "U16",
    "int32": "I32",
    "int64": "I64",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _checksum(info: dict, tensors_header: dict, data_digest: Any) -> str:
    """sha256 over the whole file's content: the state's values, the tensor table and the data."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in info.items() if k != "sha256"}, sort_keys=True).encode())
    h.update(
        json.dumps({k: v for k, v in tensors_header.items() if k != "__metadata__"}, sort_keys=True).encode()
    )
    h.update(data_digest.digest())
    return h.hexdigest()


def write_state(path: Path, key: str, state: Any) -> int:
    """Write ``state`` as a safetensors file (atomically: temp name, then rename); return its size."""
    import numpy as np

    from qvq_local import atomic

    header: dict = {}
    offset = 0
    arrays = []
    digest = hashlib.sha256()
    for name in sorted(state.tensors):
        arr = np.ascontiguousarray(state.tensors[name])
        dtype = _ST_DTYPES.get(arr.dtype.name)
        if dtype is None:
            raise ValueError(f"cannot store a {arr.dtype} array in the prefix cache")
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
        digest.update(memoryview(arr).cast("B"))
    info = {
        "version": FORMAT_VERSION,
        "key": key,
        "backend": state.backend,
        "n_cells": state.n_cells,
        "n_pos": state.n_pos,
        "ids": list(state.ids),
        "meta": state.meta,
        "data_bytes": offset,
    }
    info["sha256"] = _checksum(info, header, digest)
    header["__metadata__"] = {_META_KEY: json.dumps(info)}
    blob = json.dumps(header).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(memoryview(arr).cast("B"))
    return 8 + len(blob) + offset


def read_state(path: Path, key: str):
    """Read and check a state file; :class:`CacheFileError` saying what is wrong when it cannot be trusted."""
    import numpy as np

    from qvq_local.backends.base import PrefixState

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CacheFileError(f"cannot read it ({exc.strerror or exc})") from exc
    if len(raw) < 8:
        raise CacheFileError("truncated (no header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8 or n > 64 << 20:
        raise CacheFileError("truncated (header runs past the end of the file)")
    try:
        header = json.loads(raw[8 : 8 + n])
        info = json.loads(header.pop("__metadata__")[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CacheFileError("corrupt header") from exc
    if not isinstance(info, dict) or info.get("version") != FORMAT_VERSION:
        raise CacheFileError("written by another version of qvq-local")
    if info.get("key") != key:
        raise CacheFileError("its key does not match its name (another model, image or prompt)")
    data = memoryview(raw)[8 + n :]
    if len(data) != info.get("data_bytes"):
        raise CacheFileError(f"truncated ({len(data)} of {info.get('data_bytes')} data bytes)")
    if _checksum(info, header, hashlib.sha256(data)) != info.get("sha256"):
        raise CacheFileError("corrupt (it does not match its checksum)")
    tensors = {}
    try:
        for name, rec in header.items():
            start, end = (int(x) for x in rec["data_offsets"])
            dtype = np.dtype(_NP_DTYPES[rec["dtype"]])
            shape = tuple(int(x) for x in rec["shape"])
            if not 0 <= start <= end <= len(data) or end - start != int(np.prod(shape)) * dtype.itemsize:
                raise CacheFileError(f"corrupt (tensor {name!r} lies outside the data)")
            tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
        return PrefixState(
            backend=str(info["backend"]),
            n_cells=int(info["n_cells"]),
            n_pos=int(info["n_pos"]),
            ids=[int(i) for i in info["ids"]],
            tensors=tensors,
            meta=dict(info.get("meta") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"corrupt header ({type(exc).__name__})") from exc


@dataclass
class DiskCache:
    """Prefix states as files under ``root`` (``QVQ_HOME/cache``), at most ``max_bytes`` in all."""

    root: Path
    max_bytes: int = DEFAULT_DISK_BYTES
    #: called with a one-line notice (an untrusted file ignored, a state too large to keep)
    notice: Callable[[str], None] = field(default=lambda line: None)

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str):
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            state = read_state(path, key)
        except CacheFileError as exc:
            self.notice(f"prefix cache: ignoring {path}: {exc}; rebuilding it")
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return state

    def put(self, key: str, state: Any) -> int:
        """Write ``state``; evict the least recently used files until the total fits.  Returns bytes
        written (0 when the state alone exceeds the cap, or the disk refused it: then a notice)."""
        if state.nbytes > self.max_bytes:
            self.notice(
                f"prefix cache: not kept on disk ({file_size(state.nbytes)} is over the {file_size(self.max_bytes)} cap)"
            )
            return 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            size = write_state(self.path(key), key, state)
        except OSError as exc:
            self.notice(f"prefix cache: could not write {self.path(key)}: {exc.strerror or exc}")
            return 0
        self.evict(keep=key)
        return size

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last used) of every cache file, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def evict(self, keep: str | None = None) -> None:
        entries = self.entries()
        total = sum(e[1] for e in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path.name == f"{keep}{SUFFIX}":
                continue
            path.unlink(missing_ok=True)
            total -= size

    def clear(self) -> tuple[int, int]:
        """Remove every cache file (and leftover temp files); return (files, bytes) removed."""
        n = size = 0
        if not self.root.is_dir():
            return 0, 0
        for p in list(self.root.glob(f"*{SUFFIX}")) + list(self.root.glob(f".*{SUFFIX}.*")):
            try:
                size += p.stat().st_size
                p.unlink()
                n += 1
            except OSError:
                continue
        return n, size


def info() -> dict:
    """What ``qvq cache info`` shows: the folder, entries, bytes, cap."""
    cache = disk_cache()
    entries = cache.entries()
    total = sum(e[1] for e in entries)
    return {
        "path": str(cache.root),
        "entries": len(entries),
        "bytes": total,
        "bytes_human": file_size(total),
        "max_bytes": cache.max_bytes,
        "max_bytes_human": file_size(cache.max_bytes),
    }


def default_dir() -> Path:
    from qvq_local.config import qvq_home

    return qvq_home() / "cache"


def disk_cache(notice: Callable[[str], None] = lambda line: None) -> DiskCache:
    """The CLI's cache: ``QVQ_HOME/cache``, capped by the ``cache_max_mb`` setting (QVQ_CACHE_MAX_MB)."""
    from qvq_local import config

    cap = config.get("cache_max_mb")
    return DiskCache(default_dir(), int(cap) * MB if cap else DEFAULT_DISK_BYTES, notice)


# ---------------------------------------------------------------- the policy


@dataclass
class Outcome:
    """How a prefill went: ``source`` is "memory", "disk", "fresh" or "off"; times in seconds.
    ``images_reused``: how many of the prompt's images came from the restored state (all of them, or the
    earlier turns' when the state ended at an earlier image; 0 for a fresh prefill)."""

    source: str
    read_s: float = 0.0
    write_s: float = 0.0
    bytes: int = 0
    key: str | None = None
    state: Any = None  # the fresh prefix state still to be written to disk (see :func:`store`)
    images_reused: int = 0

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "read_s": self.read_s,
            "write_s": self.write_s,
            "bytes": self.bytes,
            "images_reused": self.images_reused,
        }


def prefill(
    session: Any,
    prompt: Any,
    key: str | None,
    memory: MemoryCache | None = None,
    disk: DiskCache | None = None,
    notice: Callable[[str], None] = lambda line: None,
    earlier: Sequence[tuple[int, str]] = (),
):
    """Prefill ``session`` with ``prompt``, reusing a cached prefix state when one matches ``key``.

    Returns ``(PrefillStats, Outcome)``.  ``key`` None (no images, backend without the capability, or
    caching off) means a plain prefill.  A fresh prefill keeps its prefix in ``memory`` right away; the
    disk write is left to :func:`store`, after the answer, so it never delays the first token.  A state
    the backend refuses (it does not fit this prompt) is dropped with a notice and the prefill runs fresh.

    ``earlier``: ``(images, key)`` of the prompt's prefixes that end at an earlier image, nearest first
    (a conversation whose new turn brings an image; only for a backend with the registry's
    ``partial_prefix`` capability).  When ``key`` is not cached but one of these is, that state is
    restored, only the later images are encoded, and the state at the last image is kept under ``key``.
    """
    if key is None:
        return session.prefill(prompt), Outcome("off")
    n_images = len(prompt.images)
    for wanted, images in ((key, n_images), *((k, n) for n, k in earlier)):
        for source, cache in (("memory", memory), ("disk", disk)):
            if cache is None:
                continue
            t0 = time.perf_counter()
            state = cache.get(wanted)
            read_s = time.perf_counter() - t0
            if state is None:
                continue
            partial = wanted != key
            try:
                stats = session.prefill(prompt, prefix=state, keep_prefix=partial)
            except InputError as exc:
                notice(f"prefix cache: {source} entry not used: {exc}; rebuilding it")
                continue
            if source == "disk" and memory is not None:
                memory.put(wanted, state)
            outcome = Outcome(source, read_s=read_s, bytes=state.nbytes, key=key, images_reused=images)
            if partial and session.prefix_state is not None:  # the state at the last image, for next time
                outcome.state = session.prefix_state
                if memory is not None:
                    memory.put(key, outcome.state)
            return stats, outcome
    stats = session.prefill(prompt, keep_prefix=True)
    state = session.prefix_state  # the registry's prefix_state capability: None when the prompt has no image
    if state is None:
        return stats, Outcome("fresh", key=key)
    if memory is not None:
        memory.put(key, state)
    return stats, Outcome("fresh", bytes=state.nbytes, key=key, state=state)


def store(outcome: Outcome, disk: DiskCache | None) -> Outcome:
    """Write a fresh prefix state to disk (after the answer); records the write time and size."""
    if disk is None or outcome.state is None or outcome.key is None:
        return outcome
    t0 = time.perf_counter()
    written = disk.put(outcome.key, outcome.state)
    if written:
        outcome.write_s = time.perf_counter() - t0
        outcome.bytes = written
    outcome.state = None
    return outcome
