"""Write a GGUF file tensor by tensor, so memory does not grow with the model.

``gguf.GGUFWriter.add_tensor`` keeps every tensor in memory until the file is written (or spools them to
a temporary file, doubling the disk traffic).  A GGUF file only needs each tensor's name, shape, type and
byte size up front: we give those to ``add_tensor_info``, let the writer emit the header, the key/values
and the tensor-info table, and then stream each tensor's bytes ourselves, one row block at a time, padding
to the file's alignment exactly as the offsets in the table say.

The file is written under a hidden ``.partial`` name and renamed only once every byte is written; on any
exception (KeyboardInterrupt included) the partial file is removed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 64 * 1024 * 1024  # largest float32 row block read at once (bounds memory)

# GGML type id -> (block size in elements, bytes per block).  Only the types this project writes.
_TYPE_SIZES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
}


@dataclass
class PlannedTensor:
    """One tensor of the output: its GGUF name, shape (row-major, as in torch), GGML type, and a
    callable producing its data as row blocks already encoded in that type (a fresh iterator per call)."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # "F32", "F16", "BF16" or "Q8_0"
    chunks: Callable[[], Iterable[Any]]

    @property
    def nbytes(self) -> int:
        block, size = _TYPE_SIZES[self.qtype]
        n = math.prod(self.shape)
        if self.shape[-1] % block:
            raise ValueError(
                f"{self.name}: width {self.shape[-1]} is not a multiple of {block} for {self.qtype}"
            )
        return n // block * size


def encode_rows(rows, qtype: str):
    """Encode a float32 row block into ``qtype`` (F32, F16 or Q8_0; BF16 data is copied raw elsewhere)."""
    import numpy as np

    if qtype == "F32":
        return np.ascontiguousarray(rows, dtype="<f4")
    if qtype == "F16":
        return np.ascontiguousarray(rows, dtype="<f2")
    if qtype == "Q8_0":
        from gguf import GGMLQuantizationType, quants

        return quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), GGMLQuantizationType.Q8_0)
    raise ValueError(f"cannot encode float rows as {qtype}")


def partial_name(final: Path) -> Path:
    """The temporary name a file is written under: hidden, marked partial, not ending in .gguf."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def write_gguf(
    path: Path,
    arch: str,
    set_metadata: Callable[[Any], None],
    tensors: list[PlannedTensor],
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write ``tensors`` with the key/values ``set_metadata(writer)`` adds to ``path``, streaming.

    Memory use is bounded by the largest row block a tensor's ``chunks()`` yields.  Returns ``path``.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = Path(path)
    tmp = partial_name(path)
    writer = GGUFWriter(tmp, arch)
    try:
        set_metadata(writer)
        for t in tensors:
            writer.add_tensor_info(
                t.name, list(t.shape), np.dtype(np.float32), t.nbytes, raw_dtype=GGMLQuantizationType[t.qtype]
            )
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        for t in tensors:
            _write_tensor_data(fout, t, on_bytes)
            writer.write_padding(fout, t.nbytes)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, path)
        return path
    except BaseException:
        try:
            writer.close()
        finally:
            tmp.unlink(missing_ok=True)
        raise


def _write_tensor_data(fout, t: PlannedTensor, on_bytes: Callable[[int], None] | None) -> None:
    written = 0
    for chunk in t.chunks():
        buf = memoryview(chunk).cast("B") if not isinstance(chunk, (bytes, bytearray)) else memoryview(chunk)
        written += len(buf)
        if written > t.nbytes:
            raise ValueError(f"tensor {t.name}: data exceeds the planned {t.nbytes} bytes")
        fout.write(buf)
        if on_bytes is not None:
            on_bytes(len(buf))
    if written != t.nbytes:
        raise ValueError(f"tensor {t.name}: wrote {written} bytes, planned {t.nbytes}")


def iter_encoded(
    ckpt,
    name: str,
    qtype: str,
    start: int = 0,
    stop: int | None = None,
    select: Callable[[Any], Any] | None = None,
    max_chunk_bytes: int | None = None,
) -> Iterator[Any]:
    """Row blocks ``[start:stop]`` of checkpoint tensor ``name``, optionally reshaped by ``select``
    (applied to each float32 block), encoded as ``qtype``.

    ``BF16`` output copies the stored bits when the source is bf16 (lossless, no float work).
    """
    import numpy as np

    max_chunk_bytes = max_chunk_bytes or CHUNK_BYTES
    if qtype == "BF16":
        if ckpt.dtype(name) != "BF16":
            raise ValueError(f"{name}: BF16 output needs a BF16 source")
        raw = ckpt.read_raw(name)
        stop = raw.shape[0] if stop is None else stop
        row_bytes = max(1, math.prod(raw.shape[1:]) * 2)
        step = max(1, max_chunk_bytes // row_bytes)
        for a in range(start, stop, step):
            block = raw[a : min(stop, a + step)]
            if select is not None:
                block = select(block)
            yield np.ascontiguousarray(block, dtype="<u2")
    else:
        for block in ckpt.iter_rows_f32(name, start, stop, max_chunk_bytes=max_chunk_bytes):
            if select is not None:
                block = select(block)
            yield encode_rows(block, qtype)
    ckpt.release()  # drop the memory maps: resident memory stays at one tensor's worth
