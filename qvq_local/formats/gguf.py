"""GGUF files: the header reader, metadata lookup, file-type names and the ``general.sampling.*`` keys.

A GGUF file is: magic, version, tensor count, key/value count, the key/values, one info record per tensor
(name, dims, type, offset into the data section), padding to ``general.alignment``, then the data.  The
header alone says where every tensor's bytes are, so a file cut short is found without reading (or
mapping) any tensor data.  gguf-py's GGUFReader is not used: it turns each of the ~150k tokenizer strings
into numpy views (seconds for one text model) and maps every tensor.  gguf-py's own tables (``Keys``,
the quantisation block sizes, ``LlamaFileType``) name what the reader finds; gguf is imported inside the
functions, so ``qvq --help`` and the MLX path never load it.

File names (projectors, split parts) are :mod:`qvq_local.formats.names`' business.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvq_local.errors import ModelError

_GGUF_MAGIC = b"GGUF"
#: value type -> struct format of the scalar GGUF types
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: arrays up to this many elements are returned as lists; longer ones (tokenizer vocabularies) are skipped
GGUF_SMALL_ARRAY = 64
_GGUF_DEFAULT_ALIGNMENT = 32
_MAX_GGUF_DIMS = 8


class GgufHeaderError(ValueError):
    """The header of a GGUF file is unreadable: the message says why, without the path."""


@dataclass(frozen=True)
class GgufTensor:
    """Where one tensor's bytes are: ``shape`` innermost dimension first, as GGUF stores it."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file
    n_bytes: int | None  # None for a tensor type this module does not know


@dataclass
class GgufHeader:
    """Key/values and tensor records of one GGUF file (see :func:`read_gguf_header`)."""

    path: Path
    size: int
    version: int
    n_tensors: int
    fields: dict[str, Any]
    tensors: dict[str, GgufTensor]
    data_offset: int

    def data_end(self) -> int:
        """The end of the last tensor's data: the file must be at least this long."""
        ends = [t.offset + (t.n_bytes or 0) for t in self.tensors.values()]
        return max(ends, default=self.data_offset)


class _Cursor:
    """Sequential reads over a file through a growing buffer: one read() per megabyte, not per value."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size = fh, size
        self.buf = b""
        self.pos = 0  # in buf
        self.base = 0  # file offset of buf[0]

    def tell(self) -> int:
        return self.base + self.pos

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available at ``pos``, or raise: the header runs past the end of the file."""
        if self.tell() + n > self.size:
            raise GgufHeaderError("truncated or corrupt GGUF file (header ends early)")
        want = max(n, 1 << 20)
        self.fh.seek(self.tell())
        self.base = self.tell()
        self.buf = self.fh.read(want)
        self.pos = 0
        if len(self.buf) < n:
            raise GgufHeaderError("truncated or corrupt GGUF file (header ends early)")

    def unpack(self, fmt: str, width: int) -> Any:
        if self.pos + width > len(self.buf):
            self._fill(width)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += width
        return value

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self._fill(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise GgufHeaderError("truncated or corrupt GGUF file (header ends early)")
        self.pos += n  # past the buffer's end is fine: the next read refills from tell()

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        if n > self.size:
            raise GgufHeaderError("corrupt GGUF header (impossible string length)")
        return self.take(n).decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` length-prefixed strings without decoding them (tokenizer vocabularies)."""
        unpack_from, buf, pos = struct.unpack_from, self.buf, self.pos
        end = len(buf)
        while count:
            if pos + 8 > end:
                self.pos = pos
                self._fill(8)
                buf, pos, end = self.buf, self.pos, len(self.buf)
            n = unpack_from("<Q", buf, pos)[0]
            if n > self.size:
                raise GgufHeaderError("corrupt GGUF header (impossible string length)")
            pos += 8 + n
            count -= 1
        self.pos = pos
        if self.tell() > self.size:
            raise GgufHeaderError("truncated or corrupt GGUF file (header ends early)")


def read_gguf_header(
    path: str | os.PathLike, *, wanted: set[str] | None = None, tensors: bool = True
) -> GgufHeader:
    """Parse a GGUF file's header: its key/values and (with ``tensors``) where each tensor's data lies.

    Reads only the header (a few MB for a text model: its vocabulary), never tensor data.  Arrays longer
    than :data:`GGUF_SMALL_ARRAY` are stepped over, not returned.  With ``wanted``, stops as soon as those
    keys are seen and reads no tensor records.  Raises ``OSError`` when the file cannot be read and
    :class:`GgufHeaderError` (message without the path) when it is not a GGUF or its header is corrupt.
    """
    from gguf import Keys

    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise GgufHeaderError("empty file (0 bytes): not a GGUF model")
    with open(p, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise GgufHeaderError("not a GGUF file (wrong magic bytes): corrupt or another format")
        cur = _Cursor(fh, size)
        cur.base = 4
        version = cur.unpack("<I", 4)
        if version not in (2, 3):
            raise GgufHeaderError(f"unsupported GGUF version {version}: corrupt, or not a GGUF v2/v3 file")
        n_tensors, n_kv = cur.unpack("<Q", 8), cur.unpack("<Q", 8)
        if n_kv > 1_000_000 or n_tensors > 10_000_000:
            raise GgufHeaderError("corrupt GGUF header (impossible counts)")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I", 4)
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                fields[key] = cur.unpack(fmt, struct.calcsize(fmt))
            elif vtype == _GGUF_STRING:
                fields[key] = cur.string()
            elif vtype == _GGUF_ARRAY:
                _read_array(cur, key, fields)
            else:
                raise GgufHeaderError(f"corrupt GGUF header (unknown value type {vtype} for {key!r})")
            if wanted is not None and wanted <= fields.keys():
                return GgufHeader(p, size, version, n_tensors, fields, {}, 0)
        if not tensors:
            return GgufHeader(p, size, version, n_tensors, fields, {}, 0)
        records = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I", 4)
            if n_dims > _MAX_GGUF_DIMS:
                raise GgufHeaderError(f"corrupt GGUF header (tensor {name!r} has {n_dims} dimensions)")
            shape = tuple(cur.unpack("<Q", 8) for _ in range(n_dims))
            records.append((name, shape, cur.unpack("<I", 4), cur.unpack("<Q", 8)))
        alignment = fields.get(Keys.General.ALIGNMENT, _GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GgufHeaderError(f"corrupt GGUF header (general.alignment {alignment!r})")
        data_offset = -(-cur.tell() // alignment) * alignment
    infos = {}
    for name, shape, ggml_type, rel in records:
        infos[name] = GgufTensor(shape, ggml_type, data_offset + rel, _tensor_bytes(shape, ggml_type))
    return GgufHeader(p, size, version, n_tensors, fields, infos, data_offset)


def _read_array(cur: _Cursor, key: str, fields: dict[str, Any]) -> None:
    itype, count = cur.unpack("<I", 4), cur.unpack("<Q", 8)
    if itype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[itype]
        width = struct.calcsize(fmt)
        if count * width > cur.size:
            raise GgufHeaderError(f"truncated or corrupt GGUF file (array {key!r} runs past the end)")
        if count <= GGUF_SMALL_ARRAY:
            fields[key] = list(struct.unpack(f"<{count}{fmt[1]}", cur.take(count * width)))
        else:
            cur.skip(count * width)
    elif itype == _GGUF_STRING:
        if count * 8 > cur.size:
            raise GgufHeaderError(f"truncated or corrupt GGUF file (array {key!r} runs past the end)")
        if count <= GGUF_SMALL_ARRAY:
            fields[key] = [cur.string() for _ in range(count)]
        else:
            cur.skip_strings(count)
    else:
        raise GgufHeaderError(f"corrupt GGUF header (array of unknown type {itype} for {key!r})")


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes of a tensor's data, from gguf's own block-size table (None for a type it does not know)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        return None
    n = 1
    for d in shape:
        n *= d
    block_size, type_size = block
    return n // block_size * type_size


def read_whole_gguf(path: str | os.PathLike) -> GgufHeader:
    """The header of a GGUF file whose tensor data all lies inside the file (a download or copy that
    stopped half-way is found here, from the header alone).

    Raises :class:`GgufHeaderError` (message without the path) for every reason the file is not a whole
    GGUF: unreadable, not a GGUF, a corrupt header, a tensor outside the data section or past the end.
    """
    p = Path(path)
    try:
        header = read_gguf_header(p)
    except OSError as err:
        raise GgufHeaderError(f"cannot read ({err.strerror or err})") from err
    for name, t in header.tensors.items():
        if t.offset < header.data_offset:
            raise GgufHeaderError(f"corrupt GGUF header (tensor {name!r} has a bad offset)")
    end = header.data_end()
    if end > header.size:
        raise GgufHeaderError(
            f"truncated: tensor data needs {end:,} bytes but the file holds {header.size:,}"
        )
    return header


def read_gguf_metadata(path: str | os.PathLike, wanted: set[str] | None = None) -> dict[str, Any]:
    """A GGUF file's key/values (not its tensors), with ``__n_tensors__``: the tensor count.

    With ``wanted``, stop as soon as those keys are seen.  Long arrays (the tokenizer's ~150k strings) are
    stepped over, not returned.  Raises ModelError naming the file when it is not a GGUF or is truncated.
    """
    path = Path(path)
    try:
        header = read_gguf_header(path, wanted=wanted, tensors=False)
    except OSError as exc:
        raise ModelError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    except GgufHeaderError as exc:
        raise ModelError(str(exc), path=path) from exc
    return {"__n_tensors__": header.n_tensors, **header.fields}


# ------------------------------------------------------------------------------------------ file types
def file_type_name(file_type: int, llama_cpp: Any = None) -> str:
    """``general.file_type`` as llama.cpp names it (``Q4_K_M``, ``F16``, ``BF16``); ``type N`` unknown.

    The names come from gguf-py's ``LlamaFileType`` and, when the caller has llama_cpp loaded, from its
    ``LLAMA_FTYPE_*`` constants first: the library that loads the file knows the newest types.
    """
    import gguf

    names: dict[int, str] = {}
    if llama_cpp is not None:
        for attr in dir(llama_cpp):
            if attr.startswith("LLAMA_FTYPE_") and attr != "LLAMA_FTYPE_GUESSED":
                value = getattr(llama_cpp, attr)
                if isinstance(value, int):
                    names.setdefault(value, _short_type_name(attr.removeprefix("LLAMA_FTYPE_")))
    for member in gguf.LlamaFileType:
        if member.name != "GUESSED":
            names.setdefault(int(member.value), _short_type_name(member.name))
    return names.get(int(file_type), f"type {file_type}")


def file_type_value(name: str) -> int:
    """The ``general.file_type`` number of the type llama.cpp calls ``name`` (``Q4_K_M``, ``F16``, ``BF16``,
    any case), from gguf-py's ``LlamaFileType``: the inverse of :func:`file_type_name`.  ``ValueError``
    for a name gguf-py does not have."""
    import gguf

    for member in gguf.LlamaFileType:
        if member.name != "GUESSED" and _short_type_name(member.name) == name.upper():
            return int(member.value)
    raise ValueError(f"gguf-py has no GGUF file type {name!r}")


def _short_type_name(name: str) -> str:
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


# ------------------------------------------------------------------------------------------ sampling keys
#: generation_config.json's numeric sampling keys: the ones a GGUF stores as its sampling defaults.
SAMPLING_KEYS: tuple[str, ...] = ("temperature", "top_k", "top_p", "repetition_penalty")


def gguf_sampling_keys() -> dict[str, str]:
    """:data:`SAMPLING_KEYS` -> the GGUF key llama.cpp's converter stores each under (``general.sampling.*``,
    read by llama-cli and llama-server as their defaults), from gguf's own ``Keys`` table.  This project's
    converter writes them and its llama backend reads them, from this one table.
    """
    from gguf import Keys

    general = Keys.General
    return {
        "temperature": general.SAMPLING_TEMP,
        "top_k": general.SAMPLING_TOP_K,
        "top_p": general.SAMPLING_TOP_P,
        "repetition_penalty": general.SAMPLING_PENALTY_REPEAT,
    }


def sampling_values(data: object) -> dict:
    """The numeric sampling values (:data:`SAMPLING_KEYS`) in a generation_config-like dict."""
    if not isinstance(data, dict):
        return {}
    return {
        k: data[k]
        for k in SAMPLING_KEYS
        if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
    }
