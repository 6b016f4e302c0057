"""Random-weight checkpoints in exactly the Hugging Face layout of Qwen/QVQ-72B-Preview.

No model hub is reachable from the machines this project is tested on, so tests, the demo and the
benchmarks run on synthetic checkpoints.  They must be indistinguishable in *layout* from the real thing
(config.json fields, tensor names and shapes, shards + index, tokenizer files and special-token ids,
processor and generation configs), so that the same loading and conversion code serves both; only the
numbers in the weights are random.

Design choices:
- Every tensor is drawn from its own generator seeded by (seed, tensor name): the bytes do not depend on
  the order of writing, and the same seed always gives the same files.
- Weights are streamed to disk tensor by tensor, big ones in row blocks, so a 7b checkpoint is written
  with a few hundred MB of memory.
- Linear weights and biases ~ N(0, 0.02); norm weights ~ 1 + N(0, 0.02) and norm biases ~ N(0, 0.02),
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

from qvq_local import atomic
from qvq_local.errors import DiskFull, InputError
from qvq_local.families import DEFAULT_FAMILY, FAMILIES, Family, qwen2vl
from qvq_local.families.qwen2vl import BASE_VOCAB as QWEN_BASE_VOCAB

from . import tokenizer_synth

DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "f32": ("F32", 4, "float32")}

_CHUNK_ELEMS = 8 * 1024 * 1024  # ~32 MB of float32 per generated block
_INIT_STD = 0.02


# The shape tables are the families' (re-exported: tests and the CLI import them from here).
SynthShape = qwen2vl.SynthShape
SHAPES = qwen2vl.SYNTH_SHAPES


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
    names = ", ".join(f.aliases[0] if f.aliases else f.name for f in FAMILIES.values())
    raise InputError(f"unknown family {family!r}; choose one of {names}")


def shapes_of(family: str | Family | None = None) -> dict[str, SynthShape]:
    """The synthetic shapes of ``family`` (None: the default family's)."""
    return get_family(family).synth_shapes


def get_shape(shape: str | SynthShape, family: str | Family | None = None) -> SynthShape:
    if not isinstance(shape, str):  # a shape object already (its family's own SynthShape class)
        return shape
    table = shapes_of(family)
    try:
        return table[shape]
    except KeyError:
        fam = get_family(family)
        raise InputError(f"unknown {fam.name} shape {shape!r}; choose one of {', '.join(table)}") from None


def family_of(shape: SynthShape) -> Family:
    """The family a shape belongs to (it names it)."""
    return FAMILIES[shape.family]


#: Embedding rows a shape gets when it carries the real Qwen tokenizer but had fewer (Qwen2-VL-2B's count).
QWEN_VOCAB_ROWS = 151936


def default_tokenizer(shape: str | SynthShape, family: str | Family | None = None) -> str:
    """``qwen`` for shapes laid out for the real vocabulary (every family's published sizes) when its file
    is installed, else ``trained`` (tiny keeps its small trained tokenizer unless asked)."""
    from . import tokenizer_qwen

    s = get_shape(shape, family)
    return "qwen" if s.tokenizer_base == QWEN_BASE_VOCAB and tokenizer_qwen.available() else "trained"


def with_tokenizer(
    shape: str | SynthShape, tokenizer: str | None, family: str | Family | None = None
) -> tuple[SynthShape, str]:
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
        tokenizer_qwen.require_vocab_file()
        if s.tokenizer_base != QWEN_BASE_VOCAB:
            s = replace(s, tokenizer_base=QWEN_BASE_VOCAB, vocab_size=max(s.vocab_size, QWEN_VOCAB_ROWS))
    elif s.tokenizer_base + len(family_of(s).special_tokens) > s.vocab_size:
        raise InputError(f"shape {s.name} has {s.vocab_size} embedding rows, too few for its tokenizer")
    return s, kind


def _check_dtype(dtype: str) -> tuple[str, int, str]:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------------------------------ configs
def build_config(shape: str | SynthShape, dtype: str = "bf16", family: str | Family | None = None) -> dict:
    """config.json contents, in the layout of the shape's family (:meth:`Family.synth_config`)."""
    s = get_shape(shape, family)
    ids = tokenizer_synth.special_ids(s.tokenizer_base)
    return family_of(s).synth_config(s, ids, DTYPES[dtype][2] if dtype in DTYPES else dtype)


#: The synthetic models' sampling values.  Near-greedy like QVQ's (the top token always wins: top_p keeps
#: only it), but each value differs from QVQ's published one (``qwen2vl.SAMPLING``, the fallback
#: when a model has none), so a test can tell "the model's values are used" from "the fallback is used".
SYNTH_SAMPLING: dict[str, float | int] = {
    "temperature": 0.05,
    "top_p": 0.005,
    "top_k": 3,
    "repetition_penalty": 1.1,
}


def build_generation_config(shape: str | SynthShape, family: str | Family | None = None) -> dict:
    """generation_config.json in QVQ-72B-Preview's layout (the family's published transformers version),
    with :data:`SYNTH_SAMPLING`'s values."""
    s = get_shape(shape, family)
    ids = tokenizer_synth.special_ids(s.tokenizer_base)
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        **SYNTH_SAMPLING,
        "transformers_version": family_of(s).synth_transformers_version,
    }


def build_preprocessor_config(shape: str | SynthShape, family: str | Family | None = None) -> dict:
    """preprocessor_config.json of the shape's family (Qwen2-VL / QVQ: the slow Qwen2VLImageProcessor)."""
    s = get_shape(shape, family)
    return family_of(s).synth_preprocessor_config(s)


# ------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "norm_weight" (1 + noise)


def tensor_specs(shape: str | SynthShape, family: str | Family | None = None) -> list[TensorSpec]:
    """Every tensor of the checkpoint, with the family's original names, in a natural writing order."""
    s = get_shape(shape, family)
    return [TensorSpec(name, tuple(dims), init) for name, dims, init in family_of(s).synth_tensors(s)]


def parameter_count(shape: str | SynthShape, family: str | Family | None = None) -> int:
    total = 0
    for spec in tensor_specs(shape, family):
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    return total


def checkpoint_bytes(shape: str | SynthShape, dtype: str = "bf16", family: str | Family | None = None) -> int:
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
    shape: str | SynthShape = "tiny",
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
    (:attr:`Family.synth_variants`; None: its default).

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
            f"the {s.name} checkpoint needs {_human(need)} but only {_human(free)} is free",
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
    if variant is None:
        return fam.synth_variants[0] if fam.synth_variants else None
    if not fam.synth_variants:
        raise InputError(f"{fam.name} checkpoints have one chat template, not variant {variant!r}")
    if variant not in fam.synth_variants:
        raise InputError(
            f"unknown {fam.name} variant {variant!r}; choose one of {', '.join(fam.synth_variants)}"
        )
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
    s: SynthShape,
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
    fam = family_of(s)
    if fam.synth_tokenizer_files is None:
        tokenizer_synth.write_tokenizer_files(
            folder,
            s.tokenizer_base,
            s.max_position_embeddings,
            tokenizer,
            system_prompt=fam.system_prompt,
            processor_class=fam.hf_processor_class,
        )
    else:
        for name, text in fam.synth_tokenizer_files(s, tokenizer, variant).items():
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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


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
        f"{_human(_folder_size(path))} in {n_shards} shard{'s' if n_shards != 1 else ''}"
    )
    return path
