"""Random-weight checkpoints in exactly the Hugging Face layout of a family's published models (QVQ's by
default).

No model hub is reachable from the machines this project is tested on, so tests, the demo and the
benchmarks run on synthetic checkpoints.  They must be indistinguishable in *layout* from the real thing
(config.json fields, tensor names and shapes, shards + index, tokenizer files and special-token ids,
processor and generation configs), so that the same loading and conversion code serves both; only the
numbers in the weights are random.

What is the family's: its shapes and tensors are its own facts (``Family.synth_shapes``,
``Family.expected_shapes``); its config, processor and tokenizer files are written by the writer
registered under its name (``convert/synth_writer.py``).  This module does the rest, the same for every
family.

Design choices:
- Every tensor is drawn from its own generator seeded by (seed, tensor name): the bytes do not depend on
  the order of writing, and the same seed always gives the same files.
- Weights are streamed to disk tensor by tensor, big ones in row blocks, so a 7b checkpoint is written
  with a few hundred MB of memory.
- Linear weights and biases ~ N(0, 0.02); norm weights ~ 1 + N(0, 0.02) (zero-centred ones, which scale by
  ``1 + weight``, ~ N(0, 0.02)) and norm biases ~ N(0, 0.02),
  so activations stay sane, logits are not degenerate, and a converter that swaps two norms or drops a
  bias shows up in parity tests (exactly-1 norms would hide that).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qvq_local import atomic
from qvq_local.errors import DiskFull, InputError
from qvq_local.families import DEFAULT_FAMILY, FAMILIES, Family, choice_name
from qvq_local.units import file_size

from . import tokenizer_synth
from .synth_writer import writer_for

DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "f32": ("F32", 4, "float32")}

_CHUNK_ELEMS = 8 * 1024 * 1024  # ~32 MB of float32 per generated block
_INIT_STD = 0.02


def get_family(family: str | Family | None = None) -> Family:
    """The registered family ``family`` names (its name or an alias, any case; None: the default)."""
    if family is None:
        return DEFAULT_FAMILY
    if isinstance(family, Family):
        return family
    want = str(family).lower()
    for f in FAMILIES.values():
        if want == f.name.lower() or want in f.aliases:
            return f
    names = ", ".join(choice_name(f) for f in FAMILIES.values())
    raise InputError(f"unknown family {family!r}; choose one of {names}")


def shapes_of(family: str | Family | None = None) -> dict[str, Any]:
    """The synthetic shapes of ``family`` (None: the default family's)."""
    return get_family(family).synth_shapes


def get_shape(shape: Any, family: str | Family | None = None) -> Any:
    """The shape ``shape`` names in ``family``'s table (a shape object is returned as it is)."""
    if not isinstance(shape, str):  # a shape object already (its family's own SynthShape class)
        return shape
    table = shapes_of(family)
    try:
        return table[shape]
    except KeyError:
        fam = get_family(family)
        raise InputError(f"unknown {fam.name} shape {shape!r}; choose one of {', '.join(table)}") from None


def vision_tower_shape(name: str, family: str | Family | None = None) -> Any:
    """Shape ``name``'s vision tower and merger width with one small text layer and the tiny shape's trained
    vocabulary: the vision side of a large shape (2b, 72b) measured without writing its text stack.
    ``"tiny"`` is the tiny shape itself."""
    import dataclasses

    shapes = shapes_of(family)
    tiny = shapes["tiny"]
    if name == "tiny":
        return tiny
    return dataclasses.replace(
        get_shape(name, family),
        name=f"{name}-vision",
        num_hidden_layers=1,
        intermediate_size=1536,
        vocab_size=tiny.vocab_size,
        tokenizer_base=tiny.tokenizer_base,
        tie_word_embeddings=False,
        max_shard_bytes=2 * 1024**3,
    )


def family_of(shape: Any) -> Family:
    """The family a shape belongs to (it names it)."""
    return FAMILIES[shape.family]


#: Embedding rows a shape gets when it carries the real Qwen tokenizer but had fewer (Qwen2-VL-2B's count).
QWEN_VOCAB_ROWS = 151936


def has_real_vocabulary(fam: Family) -> bool:
    """True when the family's vocabulary is the one ``tokenizer_qwen`` reads (Qwen2's, which Qwen2-VL,
    Qwen2.5-VL and Qwen3-VL share); Qwen3.5's 248,044-token one is not available offline."""
    return fam.base_vocab == DEFAULT_FAMILY.base_vocab


def default_tokenizer(shape: Any, family: str | Family | None = None) -> str:
    """``qwen`` for shapes laid out for the real vocabulary (every family's published sizes) when its file
    is installed and it is the family's, else ``trained`` (tiny keeps its small trained tokenizer unless
    asked)."""
    from . import tokenizer_qwen

    s = get_shape(shape, family)
    fam = family_of(s)
    real = s.tokenizer_base == fam.base_vocab and has_real_vocabulary(fam)
    return "qwen" if real and tokenizer_qwen.available() else "trained"


def with_tokenizer(shape: Any, tokenizer: str | None, family: str | Family | None = None) -> tuple[Any, str]:
    """The shape adjusted to carry ``tokenizer`` (None: the default) and the tokenizer kind.

    The real vocabulary puts the specials at 151643..151656, so a smaller shape (tiny) grows its
    embedding to :data:`QWEN_VOCAB_ROWS` rows: every id the tokenizer can produce needs a row.
    """
    from . import tokenizer_qwen

    s = get_shape(shape, family)
    kind = default_tokenizer(s) if tokenizer is None else tokenizer
    if kind not in tokenizer_synth.KINDS:
        raise InputError(f"unknown tokenizer {kind!r}; choose one of {', '.join(tokenizer_synth.KINDS)}")
    if kind == "qwen":
        fam = family_of(s)
        if not has_real_vocabulary(fam):
            raise InputError(
                f"{fam.name}'s own vocabulary ({fam.base_vocab:,} base tokens) is not available offline; "
                f"only Qwen2's ({DEFAULT_FAMILY.base_vocab:,}) is",
                hint="use --tokenizer trained",
            )
        tokenizer_qwen.require_vocab_file()
        real = fam.base_vocab
        if s.tokenizer_base != real:
            s = replace(s, tokenizer_base=real, vocab_size=max(s.vocab_size, QWEN_VOCAB_ROWS))
    elif s.tokenizer_base + len(family_of(s).special_tokens) > s.vocab_size:
        raise InputError(f"shape {s.name} has {s.vocab_size} embedding rows, too few for its tokenizer")
    return s, kind


def _check_dtype(dtype: str) -> tuple[str, int, str]:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------------------------------ configs
def special_ids(shape: Any) -> dict[str, int]:
    """The ids of the shape's family's special tokens (after its tokenizer's base vocabulary)."""
    return tokenizer_synth.special_ids(family_of(shape).special_tokens, shape.tokenizer_base)


def build_config(shape: Any, dtype: str = "bf16", family: str | Family | None = None) -> dict:
    """config.json contents, in the layout of the shape's family (its writer's)."""
    s = get_shape(shape, family)
    torch_dtype = DTYPES[dtype][2] if dtype in DTYPES else dtype
    return writer_for(family_of(s)).config(s, special_ids(s), torch_dtype)


#: The synthetic models' sampling values.  Near-greedy like QVQ's (the top token always wins: top_p keeps
#: only it), but each value differs from QVQ's published one (the Qwen2-VL family's ``sampling``, the fallback
#: when a model has none), so a test can tell "the model's values are used" from "the fallback is used".
SYNTH_SAMPLING: dict[str, float | int] = {
    "temperature": 0.05,
    "top_p": 0.005,
    "top_k": 3,
    "repetition_penalty": 1.1,
}


def build_generation_config(shape: Any, family: str | Family | None = None) -> dict:
    """generation_config.json in QVQ-72B-Preview's layout (the family's published transformers version),
    with :data:`SYNTH_SAMPLING`'s values."""
    s = get_shape(shape, family)
    ids = special_ids(s)
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        **SYNTH_SAMPLING,
        "transformers_version": writer_for(family_of(s)).transformers_version,
    }


def build_preprocessor_config(shape: Any, family: str | Family | None = None) -> dict:
    """preprocessor_config.json of the shape's family (Qwen2-VL / QVQ: the slow Qwen2VLImageProcessor)."""
    s = get_shape(shape, family)
    return writer_for(family_of(s)).preprocessor_config(s)


# ------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "norm_weight" (1 + noise)


def tensor_specs(shape: Any, family: str | Family | None = None) -> list[TensorSpec]:
    """Every tensor of the checkpoint: the ones its family expects of the config it gets, with their
    original names and shapes, in the family's order; norm weights that scale as they are drawn around 1
    (``Family.is_unit_norm_weight``)."""
    s = get_shape(shape, family)
    fam = family_of(s)
    text, vision = fam.dims_from_config(build_config(s), Path("config.json"))
    return [
        TensorSpec(name, tuple(dims), "norm_weight" if fam.is_unit_norm_weight(name) else "normal")
        for name, dims in fam.expected_shapes(text, vision).items()
    ]


def parameter_count(shape: Any, family: str | Family | None = None) -> int:
    total = 0
    for spec in tensor_specs(shape, family):
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    return total


def checkpoint_bytes(shape: Any, dtype: str = "bf16", family: str | Family | None = None) -> int:
    """Bytes of tensor data the checkpoint will hold (files add a few MB of headers and tokenizer)."""
    return parameter_count(shape, family) * _check_dtype(dtype)[1]


def _tensor_seed(seed: int, name: str):
    import numpy as np

    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest[:16], "little")])


def generate_tensor(spec: TensorSpec, seed: int) -> Iterator:
    """Yield the tensor's float32 values in row blocks (C order), from its own (seed, name) generator."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(_tensor_seed(seed, spec.name)))
    rows = spec.shape[0]
    per_row = 1
    for d in spec.shape[1:]:
        per_row *= d
    step = max(1, _CHUNK_ELEMS // max(per_row, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n, *spec.shape[1:]), dtype=np.float32)
        block *= np.float32(_INIT_STD)
        if spec.init == "norm_weight":
            block += np.float32(1.0)
        yield block


# ------------------------------------------------------------------------------------------ writing
def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_checkpoint(
    out: str | Path,
    shape: Any = "tiny",
    dtype: str = "bf16",
    seed: int = 0,
    progress: bool = False,
    force: bool = False,
    tokenizer: str | None = None,
    family: str | Family | None = None,
    variant: str | None = None,
) -> Path:
    """Write a random-weight checkpoint in the layout of ``shape``'s family (QVQ's by default) into
    ``out`` and return its path.

    ``tokenizer``: ``trained`` (a small BPE trained in-process), ``qwen`` (the real Qwen vocabulary, read
    from the installed ``dashscope`` package; a shape with fewer embedding rows grows to hold it), or None
    for :func:`default_tokenizer`.  ``variant``: the chat template, for a family that has several
    (its writer's ``variants``; None: its default).

    The folder appears only when complete: everything is written into a hidden sibling folder that is
    renamed at the end (and removed on any error or interrupt).  An existing non-empty ``out`` is
    replaced only with ``force``.  Raises ``DiskFull`` before writing when the disk lacks room.
    """
    from qvq_local.formats.safetensors import ShardedWriter

    s, kind = with_tokenizer(shape, tokenizer, family)
    variant = _check_variant(family_of(s), variant)
    st_dtype, _, _ = _check_dtype(dtype)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", path=out)
    if _is_nonempty_dir(out) and not force:
        raise InputError("folder exists and is not empty", path=out, hint="use --force to replace it")

    need = checkpoint_bytes(s, dtype) + 64 * 1024**2  # tokenizer files, headers, slack
    free = _free_bytes(out.parent if out.parent != Path("") else Path("."))
    if free < need:
        raise DiskFull(
            f"the {s.name} checkpoint needs {file_size(need)} but only {file_size(free)} is free",
            path=out.parent.resolve(),
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.partial_dir(out)
    tmp.mkdir()
    try:
        _write_files(tmp, s, dtype, st_dtype, seed, progress, ShardedWriter, kind, variant)
        atomic.replace_dir(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_variant(fam: Family, variant: str | None) -> str | None:
    """The template variant to write: ``variant`` checked against the family's, else its default."""
    variants = writer_for(fam).variants
    if variant is None:
        return variants[0] if variants else None
    if not variants:
        raise InputError(f"{fam.name} checkpoints have one chat template, not variant {variant!r}")
    if variant not in variants:
        raise InputError(f"unknown {fam.name} variant {variant!r}; choose one of {', '.join(variants)}")
    return variant


def _write_error(err: OSError, out: Path) -> Exception:
    """A failed write as one user-facing line: a full disk (or a file size limit) is DiskFull."""
    import errno

    where = Path(err.filename).name if err.filename else "the checkpoint"
    if err.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return DiskFull(f"ran out of space writing {where} ({err.strerror}); nothing was kept", path=out)
    return InputError(f"cannot write {where} ({err.strerror or err}); nothing was kept", path=out)


def _write_files(
    folder: Path,
    s: Any,
    dtype: str,
    st_dtype: str,
    seed: int,
    progress: bool,
    writer_cls,
    tokenizer: str = "trained",
    variant: str | None = None,
) -> None:
    def dump(name: str, data: dict) -> None:
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    dump("config.json", build_config(s, dtype))
    dump("generation_config.json", build_generation_config(s))
    dump("preprocessor_config.json", build_preprocessor_config(s))
    for name, text in writer_for(family_of(s)).tokenizer_files(s, tokenizer, variant).items():
        (folder / name).write_text(text, encoding="utf-8")

    specs = tensor_specs(s)
    total = checkpoint_bytes(s, dtype)
    itemsize = DTYPES[dtype][1]
    with (
        _progress(progress, f"synth {s.name} ({dtype})", total) as advance,
        writer_cls(folder, max_shard_bytes=s.max_shard_bytes) as writer,
    ):
        for spec in specs:

            def blocks(spec=spec):
                for block in generate_tensor(spec, seed):
                    yield block
                    advance(block.size * itemsize)

            writer.add_chunked(spec.name, spec.shape, st_dtype, blocks())


class _progress:
    """A Rich progress bar on stderr (or nothing), as a context manager yielding ``advance(nbytes)``."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synth_command(
    shape: str,
    out: str | Path,
    dtype: str = "bf16",
    seed: int = 0,
    force: bool = False,
    tokenizer: str | None = None,
    family: str | None = None,
) -> Path:
    """The ``qvq synth`` command: validate, write with a progress bar, print a one-line summary."""
    s, kind = with_tokenizer(shape, tokenizer, family)
    _check_dtype(dtype)
    out = Path(out)
    if _is_nonempty_dir(out) and not force:
        raise InputError("folder exists and is not empty", path=out, hint="use --force to replace it")
    path = write_checkpoint(out, shape=s, dtype=dtype, seed=seed, progress=True, force=force, tokenizer=kind)
    n_shards = len(list(path.glob("model-*.safetensors")))
    print(
        f"wrote {path}: {family_of(s).name} {s.name} ({parameter_count(s) / 1e6:,.1f}M parameters, {dtype}, seed {seed},"
        f" {kind} tokenizer), "
        f"{file_size(_folder_size(path))} in {n_shards} shard{'s' if n_shards != 1 else ''}"
    )
    return path
