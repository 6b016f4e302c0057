"""Open and validate a Hugging Face checkpoint folder of a registered family, before anything is converted.

Every converter (GGUF, MLX) calls :func:`open_checkpoint` first, so every problem a user can have with a
source folder surfaces as one ``ModelError`` naming the file, *before* any output exists: wrong
architecture, pickle-only weights (never loaded), missing or truncated shards, tensors that do not match
the config.  The returned :class:`Checkpoint` reads tensors lazily (memory-mapped; bf16 kept as raw bits
until a caller asks for float32), so opening a 146 GB checkpoint costs only its headers.

Two tensor namings may exist for the same weights (Qwen2-VL's original one, ``model.layers.*``,
``visual.*``, ``lm_head``, which QVQ-72B-Preview ships, and transformers 5's, ``model.language_model.*``,
``model.visual.*``, ``lm_head``).  A :class:`Checkpoint` always speaks the family's original naming
(:meth:`Family.original_tensor_name`); it remembers which stored name each tensor came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.errors import ModelError
from qvq_local.families import Family, describe_supported, family_for_config
from qvq_local.formats.names import PICKLE_SUFFIXES
from qvq_local.formats.safetensors import INDEX_NAME

FLOAT_DTYPES = ("F32", "F16", "BF16")

# Files a converter may need besides the weights, in the order they are looked for.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
OTHER_FILE_NAMES = ("preprocessor_config.json", "generation_config.json")


@dataclass
class Checkpoint:
    """A validated checkpoint.  Tensor access uses the family's original names (see module doc)."""

    folder: Path
    config: dict[str, Any]
    text: Any  # the family's TextDims
    vision: Any  # the family's VisionDims
    naming: str  # "original" or "transformers5"
    family: Family
    files: dict[str, Path]  # tokenizer/preprocessor/generation files present, by file name
    _store: Any = field(repr=False)  # ShardedCheckpoint
    _stored_names: dict[str, str] = field(repr=False)  # original name -> name in the files

    # ---- names and shapes
    @property
    def names(self) -> list[str]:
        """All tensor names, original naming, in a stable order (text first, then vision)."""
        return list(self._stored_names)

    def __contains__(self, name: object) -> bool:
        return name in self._stored_names

    def stored_name(self, name: str) -> str:
        """The name under which ``name`` is stored in the safetensors files."""
        try:
            return self._stored_names[name]
        except KeyError:
            raise ModelError(f"no tensor named {name!r}", path=self.folder) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._store.shape(self.stored_name(name)))

    def dtype(self, name: str) -> str:
        """safetensors dtype string: F32, F16 or BF16."""
        return self._store.dtype(self.stored_name(name))

    def nbytes(self, name: str) -> int:
        return self._store.nbytes(self.stored_name(name))

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data across all shards."""
        return sum(self.nbytes(n) for n in self._stored_names)

    @property
    def shards(self) -> list[Path]:
        return list(self._store.shards)

    @property
    def preprocessor_config(self) -> dict[str, Any]:
        path = self.files.get("preprocessor_config.json")
        return _read_json(path) if path else {}

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        path = self.files.get("tokenizer_config.json")
        return _read_json(path) if path else {}

    # ---- data
    def read_raw(self, name: str):
        """Memory-mapped, read-only view in the storage dtype (BF16 as uint16 bits); no copy."""
        return self._store.raw(self.stored_name(name))

    def read_f32(self, name: str):
        """A float32 copy of the whole tensor (bf16 widened exactly).  For small tensors."""
        return self._store.to_f32(self.stored_name(name))

    def iter_rows_f32(
        self, name: str, start: int = 0, stop: int | None = None, max_chunk_bytes: int = 64 * 1024 * 1024
    ) -> Iterator[Any]:
        """Yield float32 copies of consecutive row blocks ``[start:stop]`` along axis 0.

        Each block holds at most ``max_chunk_bytes`` of float32 (at least one row), so converting a
        tensor of any size needs only that much memory.
        """
        raw = self.read_raw(name)
        stop = raw.shape[0] if stop is None else stop
        row_elems = math.prod(raw.shape[1:]) if raw.ndim > 1 else 1
        step = max(1, max_chunk_bytes // max(1, row_elems * 4))
        for a in range(start, stop, step):
            yield to_f32(raw[a : min(stop, a + step)], self.dtype(name))

    def release(self) -> None:
        """Drop the memory maps (they are re-created on the next read), so resident memory stays small."""
        self._store.close()

    close = release


def to_f32(raw, dtype: str):
    """float32 copy of a raw block in safetensors ``dtype`` (BF16 given as uint16 bits)."""
    import numpy as np

    from qvq_local.formats.safetensors import bf16_bits_to_f32

    if dtype == "BF16":
        return bf16_bits_to_f32(np.asarray(raw))
    return np.array(raw, dtype=np.float32, copy=True)


# ------------------------------------------------------------------------------------------ opening
def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Validate ``folder`` as a safetensors checkpoint of a registered family and open it lazily.

    Checks, in order: config.json and the architecture; weight files (pickle-only folders are refused,
    never opened); every shard present and complete; tokenizer present; the tensor set and every
    tensor's shape and dtype against the config.  Raises ``ModelError`` naming the file on the first
    problem.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ModelError("no such folder", path=folder)
    if not folder.is_dir():
        raise ModelError("is not a folder (expected a Hugging Face checkpoint folder)", path=folder)

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError("no config.json: not a Hugging Face checkpoint folder", path=folder)
    config = _read_json(config_path)
    family = _check_architecture(config, config_path)
    text, vision = family.dims_from_config(config, config_path)

    _check_weight_files(folder)
    from qvq_local.formats.safetensors import ShardedCheckpoint

    store = ShardedCheckpoint(folder)  # checks the index, shard presence, headers vs file sizes

    files = {n: folder / n for n in TOKENIZER_FILE_NAMES + OTHER_FILE_NAMES if (folder / n).is_file()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files.keys():
        raise ModelError("no tokenizer.json (or vocab.json + merges.txt)", path=folder)

    stored = _normalised_names(store, folder, family)
    naming = "transformers5" if any(n != s for n, s in stored.items()) else "original"
    ckpt = Checkpoint(
        folder=folder,
        config=config,
        text=text,
        vision=vision,
        naming=naming,
        family=family,
        files=files,
        _store=store,
        _stored_names=stored,
    )
    _check_tensors(ckpt)
    return ckpt


def checkpoint_family(folder: str | Path) -> Family:
    """The registered family of the checkpoint in ``folder`` (from its config.json), or a ModelError."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise ModelError("no config.json: not a Hugging Face checkpoint folder", path=path.parent)
    return _check_architecture(_read_json(path), path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read JSON ({err})", path=path) from None
    if not isinstance(data, dict):
        raise ModelError("is not a JSON object", path=path)
    return data


def _check_architecture(config: dict[str, Any], path: Path) -> Family:
    family = family_for_config(config)
    if family is not None:
        return family
    archs = config.get("architectures") or []
    found = ", ".join(map(str, archs)) or f"model_type {config.get('model_type')!r}"
    raise ModelError(
        f"unsupported architecture {found}",
        path=path,
        hint=f"qvq-local converts {describe_supported()} checkpoints",
    )


def _check_weight_files(folder: Path) -> None:
    """Refuse folders whose weights are only pickles (never opened) or absent."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == INDEX_NAME for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(
            f"only pickle weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}), "
            "which qvq-local never loads",
            path=folder / pickles[0],
            hint="use a safetensors checkpoint",
        )
    raise ModelError(f"no safetensors weights (model.safetensors or {INDEX_NAME})", path=folder)


def _normalised_names(store: Any, folder: Path, family: Family) -> dict[str, str]:
    stored: dict[str, str] = {}
    for name in store:
        norm = family.original_tensor_name(name)
        if norm in stored:
            raise ModelError(
                f"tensor {norm!r} is stored twice (as {stored[norm]!r} and {name!r})",
                path=store.shard_of(name),
            )
        stored[norm] = name
    return dict(sorted(stored.items(), key=lambda kv: _sort_key(kv[0], family)))


def _sort_key(name: str, family: Family) -> tuple:
    """Text tensors first, then vision; blocks in numeric order."""
    parts = name.split(".")
    return (family.is_vision_tensor(name), [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


# ------------------------------------------------------------------------------------------ shape checks
def _check_tensors(ckpt: Checkpoint) -> None:
    have = ckpt._stored_names
    # the family's published layout, or another one the family reads (transformers 5's save_pretrained)
    want = ckpt.family.layout_shapes(ckpt.text, ckpt.vision, {n: ckpt.shape(n) for n in have})
    # A tied checkpoint may still carry lm_head; accept it if its shape is right.
    if ckpt.text.tie_word_embeddings and "lm_head.weight" in have:
        want["lm_head.weight"] = (ckpt.text.vocab_size, ckpt.text.hidden_size)
    missing = [n for n in want if n not in have]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(
            f"tensor {missing[0]!r}{more} missing for the config's dimensions",
            path=ckpt.folder,
            hint="a shard may be missing or config.json may not match the weights",
        )
    for name, stored_name in have.items():
        shard = ckpt._store.shard_of(stored_name)
        if name not in want:
            raise ModelError(
                f"unexpected tensor {stored_name!r} (not part of {ckpt.family.name})", path=shard
            )
        got = ckpt.shape(name)
        if got != want[name]:
            raise ModelError(
                f"tensor {stored_name!r} has shape {list(got)} but config.json implies {list(want[name])}",
                path=shard,
            )
        dtype = ckpt.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"tensor {stored_name!r} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}",
                path=shard,
            )
