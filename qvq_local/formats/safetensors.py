"""Torch-free safetensors reading and streaming writing, with numpy only.

Why our own: numpy has no bfloat16, and the ``safetensors`` package's numpy API refuses BF16 files, yet
every Qwen checkpoint is BF16.  The format is simple (8-byte little-endian header length, a JSON header,
then one flat data buffer), so we parse the header ourselves, check it hard (a lying header must become a
one-line ``ModelError``, not a segfault or garbage weights) and memory-map the data.  BF16 tensors are
returned as their raw ``uint16`` bits; :func:`bf16_bits_to_f32` widens them exactly.

The writer streams: each tensor goes to disk as soon as it is added (or chunk by chunk), so writing a
15 GB checkpoint needs no more memory than its largest chunk.  Everything is written under temporary
names and renamed only when the whole set is complete; on any exception (KeyboardInterrupt included) the
partial files are removed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qvq_local.errors import ModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype string -> (numpy dtype string, itemsize). BF16 and the FP8 kinds are raw bits.
_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("|b1", 1),
    "U8": ("|u1", 1),
    "I8": ("|i1", 1),
    "F8_E4M3": ("|u1", 1),
    "F8_E5M2": ("|u1", 1),
    "U16": ("<u2", 2),
    "I16": ("<i2", 2),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "U32": ("<u4", 4),
    "I32": ("<i4", 4),
    "F32": ("<f4", 4),
    "U64": ("<u8", 8),
    "I64": ("<i8", 8),
    "F64": ("<f8", 8),
}
# numpy kind+itemsize -> safetensors dtype, for the writer's inference (uint16 means U16, never BF16).
_FROM_NUMPY = {
    "b1": "BOOL",
    "u1": "U8",
    "i1": "I8",
    "u2": "U16",
    "i2": "I16",
    "f2": "F16",
    "u4": "U32",
    "i4": "I32",
    "f4": "F32",
    "u8": "U64",
    "i8": "I64",
    "f8": "F64",
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string (raises ValueError for an unknown one)."""
    try:
        return _DTYPES[dtype][1]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {dtype!r}") from None


# ------------------------------------------------------------------------------------------ bf16 bits
def bf16_bits_to_f32(bits):
    """Widen bfloat16 bit patterns (uint16 array) to float32, exactly."""
    import numpy as np

    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bf16 bits must be uint16, got {bits.dtype}")
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values):
    """Round float32 values to bfloat16 (round to nearest, ties to even) and return the uint16 bits.

    NaNs stay NaN (quietened), infinities stay infinite, values past bf16's range round to infinity,
    as IEEE rounding does (and as torch's ``.to(torch.bfloat16)`` does).
    """
    import numpy as np

    f = np.ascontiguousarray(values, dtype=np.float32)
    u = f.view(np.uint32)
    lsb = (u >> 16) & 1
    rounded = ((u + (np.uint32(0x7FFF) + lsb)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


# ------------------------------------------------------------------------------------------ reading
class SafetensorsFile:
    """One ``.safetensors`` file: validated header, tensors memory-mapped on demand.

    ``raw(name)`` returns a read-only view in the storage dtype (BF16 as uint16 bits); ``to_f32(name)``
    returns a float32 copy.  Every structural problem raises ``ModelError`` naming the file;
    :meth:`inspect` is the same check reporting findings instead (``qvq doctor``), so doctor and convert
    judge a file by one set of rules.

    The rules are the reference implementation's (the ``safetensors`` package that transformers and
    mlx-vlm load with): tensors' data must tile the data section exactly, so a gap between two tensors
    (even 8 bytes) or bytes after the last tensor is an error, not a warning -- those loaders refuse such
    a file ("invalid offset", "file not fully covered").
    """

    @classmethod
    def inspect(cls, path: str | Path) -> tuple[SafetensorsFile | None, list[tuple[str, str]]]:
        """Findings mode: ``(file, [])`` for a sound file, else ``(None, [("error", message)])``.

        The message is the raising mode's without the path (the caller's finding carries it).
        """
        try:
            return cls(path), []
        except ModelError as err:
            text = str(err)
            prefix = f"{err.path}: " if err.path else ""
            return None, [("error", text[len(prefix) :] if prefix and text.startswith(prefix) else text)]
        except OSError as err:
            return None, [("error", f"cannot read ({err.strerror or err})")]

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap = None
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ModelError(
                        f"truncated or not a safetensors file ({size} bytes, shorter than its 8-byte "
                        "header length)",
                        path=self.path,
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or n > size - 8:
                    raise ModelError(
                        f"header length {n} does not fit the file ({size} bytes): "
                        "truncated or not a safetensors file",
                        path=self.path,
                    )
                raw_header = fh.read(n)
        except FileNotFoundError:
            raise ModelError("file not found", path=self.path) from None
        except IsADirectoryError:
            raise ModelError("is a folder, expected a .safetensors file", path=self.path) from None
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelError(
                f"header is not valid JSON ({err}): corrupt or not a safetensors file", path=self.path
            ) from None
        if not isinstance(header, dict):
            raise ModelError("header is not a JSON object", path=self.path)
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ModelError("__metadata__ is not an object", path=self.path)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._info[name] = self._check_entry(name, entry)
        self._check_layout()

    # ---- validation
    def _check_entry(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        if not isinstance(entry, dict):
            raise ModelError(f"tensor {name!r}: header entry is not an object", path=self.path)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise ModelError(f"tensor {name!r}: unknown dtype {dtype!r}", path=self.path)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ModelError(f"tensor {name!r}: bad shape {shape!r}", path=self.path)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ModelError(f"tensor {name!r}: bad data_offsets {offsets!r}", path=self.path)
        begin, end = offsets
        want = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != want:
            raise ModelError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {want} bytes but its "
                f"offsets span {end - begin}",
                path=self.path,
            )
        if end > self._data_len:
            raise ModelError(
                f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds "
                f"only {self._data_len}",
                path=self.path,
            )
        return dtype, tuple(shape), begin, end

    def _check_layout(self) -> None:
        spans = sorted((b, e, name) for name, (_, _, b, e) in self._info.items())
        pos = 0
        for b, e, name in spans:
            if b != pos:
                what = (
                    "overlaps the previous tensor"
                    if b < pos
                    else f"leaves a gap of {b - pos} bytes after the previous tensor"
                )
                raise ModelError(f"tensor {name!r}: data {what} (offset {b}, expected {pos})", path=self.path)
            pos = e
        if pos != self._data_len:
            raise ModelError(
                f"{self._data_len - pos} bytes after the last tensor: the data section is {self._data_len} "
                f"bytes but the header accounts for {pos}",
                path=self.path,
            )

    # ---- access
    def _get(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._info[name]
        except KeyError:
            raise TensorNotFound(f"no tensor named {name!r}", path=self.path) from None

    def keys(self) -> list[str]:
        """Tensor names in file order (by data offset)."""
        return [n for n, _ in sorted(self._info.items(), key=lambda kv: kv[1][2])]

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._info)

    def dtype(self, name: str) -> str:
        return self._get(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name)[1]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._get(name)
        return e - b

    def raw(self, name: str):
        """Read-only memory-mapped view in the storage dtype (BF16 and FP8 as unsigned-int bits)."""
        import numpy as np

        dtype, shape, b, e = self._get(name)
        np_dtype = np.dtype(_DTYPES[dtype][0])
        if e == b:
            return np.zeros(shape, dtype=np_dtype)
        if self._mmap is None:
            self._mmap = np.memmap(
                self.path, dtype=np.uint8, mode="r", offset=self._data_start, shape=(self._data_len,)
            )
        return self._mmap[b:e].view(np_dtype).reshape(shape)

    def to_f32(self, name: str):
        """A float32 copy of the tensor (BF16 widened exactly; FP8 is not supported)."""
        import numpy as np

        dtype = self.dtype(name)
        arr = self.raw(name)
        if dtype == "BF16":
            return bf16_bits_to_f32(arr)
        if dtype.startswith("F8"):
            raise ModelError(f"tensor {name!r}: {dtype} is not supported", path=self.path)
        return np.asarray(arr, dtype=np.float32).copy()

    def close(self) -> None:
        self._mmap = None

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


class TensorNotFound(ModelError, KeyError):
    """A tensor name the checkpoint does not hold (also a KeyError, so ``except KeyError`` works)."""

    __str__ = Exception.__str__


class ShardedCheckpoint:
    """All tensors of a Hugging Face checkpoint folder, across its shards.

    Reads ``model.safetensors.index.json`` when present (every shard it lists must exist and hold the
    tensors it is said to hold), else a single ``model.safetensors``.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError("not a folder", path=self.folder)
        index = self.folder / INDEX_NAME
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ModelError(f"not valid JSON ({err})", path=index) from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError("has no weight_map", path=index)
            self.metadata: dict[str, Any] = dict(data.get("metadata") or {})
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith(".."):
                    raise ModelError(f"bad shard name {shard!r}", path=index)
                shard_path = self.folder / shard
                if not shard_path.is_file():
                    raise ModelError(f"missing shard {shard} listed in {INDEX_NAME}", path=self.folder)
                self._files[shard] = SafetensorsFile(shard_path)
            for name, shard in weight_map.items():
                if name not in self._files[shard]:
                    raise ModelError(
                        f"{INDEX_NAME} says {name!r} is in {shard} but it is not there", path=self.folder
                    )
                self._where[name] = shard
        elif (self.folder / SINGLE_NAME).is_file():
            f = SafetensorsFile(self.folder / SINGLE_NAME)
            self._files[SINGLE_NAME] = f
            self._where = {n: SINGLE_NAME for n in f}
            self.metadata = dict(f.metadata)
        else:
            raise ModelError(f"no {INDEX_NAME} or {SINGLE_NAME}", path=self.folder)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise TensorNotFound(f"no tensor named {name!r}", path=self.folder) from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def shards(self) -> list[Path]:
        return [f.path for f in self._files.values()]

    def shard_of(self, name: str) -> Path:
        return self._file(name).path

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def raw(self, name: str):
        return self._file(name).raw(name)

    def to_f32(self, name: str):
        return self._file(name).to_f32(name)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._where)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __repr__(self) -> str:
        return f"ShardedCheckpoint({str(self.folder)!r}, {len(self)} tensors in {len(self._files)} shards)"


# ------------------------------------------------------------------------------------------ writing
_HEADER_RESERVE = 256 * 1024  # header room reserved in big shards so they need no copy at the end
_SMALL_SHARD = 64 * 1024 * 1024  # shards below this are compacted (copied) so they carry no padding


class _Shard:
    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.fh = open(path, "wb")  # noqa: SIM115 (closed by ShardedWriter when the shard ends)
        self.fh.seek(reserve)
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0  # data bytes written


class ShardedWriter:
    """Write tensors one at a time into ``model-0000K-of-0000N.safetensors`` shards plus the index.

    Use as a context manager (or call :meth:`close` / :meth:`abort`).  A shard is closed when the next
    tensor would push it past ``max_shard_bytes`` (a tensor bigger than that gets a shard to itself).
    Shards are written under hidden temporary names; :meth:`close` renames them once their count is
    known and writes ``model.safetensors.index.json`` last, so a folder with an index is complete.
    """

    def __init__(
        self, folder: str | Path, max_shard_bytes: int = 4_000_000_000, metadata: dict[str, str] | None = None
    ):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._tag = f"{os.getpid()}-{id(self):x}"
        self._current: _Shard | None = None
        self._done: list[tuple[Path, dict[str, dict[str, Any]]]] = []  # closed temp shards
        self._names: set[str] = set()
        self._finished: list[Path] = []
        self.total_size = 0
        self._closed = False

    # ---- public API
    def add(self, name: str, array, dtype: str | None = None) -> None:
        """Write one tensor now.  ``dtype`` is the safetensors dtype to store; by default it follows
        the array's numpy dtype.  With ``dtype="BF16"`` a uint16 array is taken as raw bits and a float
        array is rounded to nearest even."""
        import numpy as np

        arr = np.asarray(array)
        st_dtype = dtype or _numpy_to_st(arr.dtype)
        self.add_chunked(name, arr.shape, st_dtype, [arr])

    def add_chunked(self, name: str, shape: Iterable[int], dtype: str, chunks: Iterable[Any]) -> None:
        """Write one tensor from an iterable of chunks (row blocks in C order), holding one at a time."""
        import numpy as np

        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * itemsize(dtype)
        shard = self._shard_for(nbytes)
        begin = shard.size
        written = 0
        target = np.dtype(_DTYPES[dtype][0])
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if dtype == "BF16" and chunk.dtype != np.uint16:
                chunk = f32_to_bf16_bits(chunk)
            else:
                chunk = np.ascontiguousarray(chunk, dtype=target)
            buf = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            written += len(buf)
            if written > nbytes:
                raise ValueError(f"tensor {name!r}: chunks hold more than the {nbytes} bytes of {shape}")
            shard.fh.write(buf)
        if written != nbytes:
            raise ValueError(
                f"tensor {name!r}: chunks hold {written} bytes, shape {shape} of {dtype} needs {nbytes}"
            )
        shard.size += nbytes
        shard.entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        self._names.add(name)
        self.total_size += nbytes

    def close(self) -> list[Path]:
        """Finish the last shard, rename all shards to their final names, write the index."""
        if self._closed:
            return self._finished
        try:
            self._close_shard()
            n = len(self._done)
            if n == 0:
                raise ValueError("no tensors were added")
            weight_map: dict[str, str] = {}
            finals: list[tuple[Path, Path]] = []
            for k, (tmp, entries) in enumerate(self._done, start=1):
                final = self.folder / f"model-{k:05d}-of-{n:05d}.safetensors"
                finals.append((tmp, final))
                for name in entries:
                    weight_map[name] = final.name
            for tmp, final in finals:
                os.replace(tmp, final)
                self._finished.append(final)
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            tmp_index = self.folder / f".{INDEX_NAME}.tmp-{self._tag}"
            tmp_index.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp_index, self.folder / INDEX_NAME)
            self._closed = True
            return self._finished
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove every file this writer created (temporary or already renamed)."""
        self._closed = True
        if self._current is not None:
            self._current.fh.close()
            self._done.append((self._current.path, {}))
            self._current = None
        for path in [p for p, _ in self._done] + self._finished:
            path.unlink(missing_ok=True)
        (self.folder / f".{INDEX_NAME}.tmp-{self._tag}").unlink(missing_ok=True)
        for p in self.folder.glob(f".shard-*.tmp-{self._tag}*"):
            p.unlink(missing_ok=True)
        self._finished = []

    def __enter__(self) -> ShardedWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- shard handling
    def _shard_for(self, nbytes: int) -> _Shard:
        cur = self._current
        if cur is not None and cur.entries and cur.size + nbytes > self.max_shard_bytes:
            self._close_shard()
            cur = None
        if cur is None:
            k = len(self._done) + 1
            path = self.folder / f".shard-{k:05d}.tmp-{self._tag}"
            reserve = _HEADER_RESERVE if self.max_shard_bytes >= _SMALL_SHARD else 0
            cur = self._current = _Shard(path, reserve)
        return cur

    def _close_shard(self) -> None:
        shard = self._current
        if shard is None:
            return
        self._current = None
        header = json.dumps({"__metadata__": self.metadata, **shard.entries}, separators=(",", ":"))
        hbytes = header.encode("utf-8")
        hlen = (len(hbytes) + 7) // 8 * 8  # keep the data 8-byte aligned
        if shard.size >= _SMALL_SHARD and shard.reserve and 8 + hlen <= shard.reserve:
            # Fill the reserved room exactly: JSON may be followed by spaces.
            hlen = shard.reserve - 8
            shard.fh.seek(0)
            shard.fh.write(struct.pack("<Q", hlen) + hbytes.ljust(hlen, b" "))
            shard.fh.close()
            self._done.append((shard.path, shard.entries))
            return
        # Header did not fit or the shard is small: copy the data behind a tight header.
        shard.fh.close()
        compact = shard.path.with_name(shard.path.name + ".c")
        try:
            with open(shard.path, "rb") as src, open(compact, "wb") as dst:
                dst.write(struct.pack("<Q", hlen) + hbytes.ljust(hlen, b" "))
                src.seek(shard.reserve)
                _copy_rest(src, dst, shard.size)
            os.replace(compact, shard.path)
        except BaseException:
            compact.unlink(missing_ok=True)
            shard.path.unlink(missing_ok=True)
            raise
        self._done.append((shard.path, shard.entries))


def _copy_rest(src, dst, count: int) -> None:
    """Copy ``count`` bytes from src's position to dst's, in the kernel when the platform allows."""
    dst.flush()
    in_off, out_off, remaining = src.tell(), dst.tell(), count
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(remaining, 1 << 30), in_off, out_off)
                if n == 0:
                    break
                remaining -= n
                in_off += n
                out_off += n
        except OSError:
            pass  # e.g. not supported across these files: finish with plain reads
    src.seek(in_off)
    dst.seek(out_off)
    while remaining:
        block = src.read(min(remaining, 16 * 1024 * 1024))
        if not block:
            raise OSError(f"{src.name}: ended {remaining} bytes early")
        dst.write(block)
        remaining -= len(block)


def _numpy_to_st(np_dtype) -> str:
    key = np_dtype.str[1:] if np_dtype.kind != "b" else "b1"
    try:
        return _FROM_NUMPY[key]
    except KeyError:
        raise ValueError(f"no safetensors dtype for numpy {np_dtype}") from None
