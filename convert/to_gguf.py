"""Hugging Face checkpoint -> GGUF text model + mmproj, torch-free and streaming.

The checkpoint's family has a converter class registered under its name (``convert/gguf_converter.py``);
this module drives it.

Steps: validate everything (checkpoint, tokenizer, image settings, options, quantiser, disk space) before
writing a byte; write the mmproj; write the text model (directly for f32/f16, else at the checkpoint's own
precision into a hidden intermediate that llama.cpp's quantiser turns into the requested type); rename
both into place only when both are complete.  Reading is memory-mapped and writing streams row blocks,
so memory stays bounded (a few hundred MB) whatever the model size.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qvq_local.convert.checkpoint import Checkpoint, open_checkpoint
from qvq_local.convert.gguf_converter import converter_for
from qvq_local.convert.gguf_mmproj import arch as mmproj_arch
from qvq_local.convert.gguf_quantize import check_quantiser_available, quantize_gguf
from qvq_local.convert.gguf_stream import PlannedTensor, write_gguf
from qvq_local.convert.gguf_text import read_vocab
from qvq_local.convert.quants import (
    DEFAULT_GGUF_QUANT,
    DEFAULT_MMPROJ_QUANT,
    GGUF_QUANTS,
    GGUF_TYPES,
    MMPROJ_QUANTS,
)

from qvq_local.errors import DiskFull, InputError


@dataclass(frozen=True)
class GgufPair:
    """The two files llama.cpp needs: the text model and the vision projector."""

    model: Path
    mmproj: Path


def gguf_file_names(src_name: str, quant: str, mmproj_quant: str) -> tuple[str, str]:
    """Output file names: ``<name>-<QUANT>.gguf`` and ``mmproj-<name>-<QUANT>.gguf``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src_name).strip("-.") or "model"
    return f"{stem}-{GGUF_TYPES[quant].label}.gguf", f"mmproj-{stem}-{GGUF_TYPES[mmproj_quant].label}.gguf"


def model_name_for(folder: Path) -> str:
    """A readable model name for a checkpoint folder.

    A Hugging Face cache snapshot (``models--Qwen--QVQ-72B-Preview/snapshots/<commit>``) is named after the
    repository, not the commit hash; any other folder after itself.
    """
    folder = folder.resolve()
    if re.fullmatch(r"[0-9a-f]{40}", folder.name) and folder.parent.name == "snapshots":
        repo = folder.parent.parent.name
        if repo.startswith("models--"):
            return repo.split("--")[-1]
    return folder.name


def convert_to_gguf(
    src: str | Path,
    out_dir: str | Path,
    quant: str = DEFAULT_GGUF_QUANT,
    mmproj_quant: str = DEFAULT_MMPROJ_QUANT,
    progress: bool = False,
    *,
    name: str | None = None,
) -> GgufPair:
    """Convert the checkpoint folder ``src`` into a GGUF pair in ``out_dir``.

    ``quant``: one of :data:`~qvq_local.convert.quants.GGUF_QUANTS` (the text model); ``mmproj_quant``: one
    of :data:`~qvq_local.convert.quants.MMPROJ_QUANTS`.
    ``name`` (general.name and the file-name stem) defaults to :func:`model_name_for` of ``src``.
    Raises InputError for bad options, ModelError for a bad checkpoint, BackendUnavailable when a
    quantised type is asked for without llama-cpp-python, DiskFull when the outputs cannot fit; all of
    these before any output file exists.  Interrupted or failed runs leave no output files behind.
    """
    quant, mmproj_quant = str(quant).lower(), str(mmproj_quant).lower()
    if quant not in GGUF_QUANTS:
        raise InputError(f"unknown GGUF quantisation {quant!r}; choose one of {', '.join(GGUF_QUANTS)}")
    if mmproj_quant not in MMPROJ_QUANTS:
        raise InputError(
            f"unknown mmproj quantisation {mmproj_quant!r}; choose one of {', '.join(MMPROJ_QUANTS)}"
        )
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output path exists and is not a folder", path=out_dir)

    ckpt = open_checkpoint(src)
    try:
        return _convert(ckpt, out_dir, quant, mmproj_quant, progress, name or model_name_for(ckpt.folder))
    finally:
        ckpt.release()


def _convert(
    ckpt: Checkpoint, out_dir: Path, quant: str, mmproj_quant: str, progress: bool, name: str
) -> GgufPair:
    # ---- everything that can fail is checked here, before any output exists
    conv = converter_for(ckpt)  # the family's converter class
    conv.check_supported()  # vision shapes llama.cpp's projector for this family cannot run
    vocab = read_vocab(ckpt)
    from qvq_local.formats.gguf import file_type_value

    direct = GGUF_TYPES[quant].direct
    if not direct:
        check_quantiser_available()
    mm_type = GGUF_TYPES[mmproj_quant].label
    mm_plan = conv.mmproj_tensor_plan(mm_type)
    mm_meta = conv.mmproj_metadata(file_type_value(mm_type), name)
    text_type = GGUF_TYPES[quant].label if direct else "source"
    text_plan = conv.text_tensor_plan(text_type)
    text_file_type = file_type_value(text_type) if direct else _dominant_file_type(text_plan)
    text_meta = conv.text_metadata(vocab, text_file_type, name)
    text_arch = ckpt.family.gguf_text_arch
    model_name, mmproj_name = gguf_file_names(name, quant, mmproj_quant)
    model_path, mmproj_path = out_dir / model_name, out_dir / mmproj_name

    mm_bytes = sum(t.nbytes for t in mm_plan)
    text_bytes = sum(t.nbytes for t in text_plan)
    n_text = sum(math.prod(t.shape) for t in text_plan)
    final_text_bytes = text_bytes if direct else int(n_text * GGUF_TYPES[quant].bits_per_weight / 8)
    _check_disk(out_dir, mm_bytes + text_bytes + (0 if direct else final_text_bytes))

    # ---- write
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}"
    staged_mm = out_dir / f".{mmproj_name}.staged-{tag}"
    staged_model = out_dir / f".{model_name}.staged-{tag}"
    intermediate = out_dir / f".{model_name}.source-{tag}"
    renamed: list[Path] = []
    try:
        with _progress(progress) as bar:
            write_gguf(staged_mm, mmproj_arch(), mm_meta, mm_plan, bar(f"mmproj ({mm_type})", mm_bytes))
            if direct:
                write_gguf(
                    staged_model,
                    text_arch,
                    text_meta,
                    text_plan,
                    bar(f"model ({text_type})", text_bytes),
                )
            else:
                write_gguf(
                    intermediate, text_arch, text_meta, text_plan, bar("model (source precision)", text_bytes)
                )
                done = bar(f"quantising to {GGUF_TYPES[quant].label}", final_text_bytes)
                seen = [0]

                def report(size: int) -> None:
                    step = min(size, final_text_bytes) - seen[0]
                    if step > 0:
                        seen[0] += step
                        done(step)

                quantize_gguf(intermediate, staged_model, quant, on_progress=report)
                done(max(0, final_text_bytes - seen[0]))
                intermediate.unlink(missing_ok=True)
        os.replace(staged_mm, mmproj_path)
        renamed.append(mmproj_path)
        os.replace(staged_model, model_path)
        renamed.append(model_path)
    except BaseException:
        for p in (staged_mm, staged_model, intermediate, *renamed):
            p.unlink(missing_ok=True)
        for p in (staged_mm, staged_model, intermediate):
            p.with_name(f".{p.name}.partial-{os.getpid()}").unlink(missing_ok=True)
        raise
    return GgufPair(model=model_path, mmproj=mmproj_path)


def _dominant_file_type(plan: list[PlannedTensor]) -> int:
    """general.file_type of a source-precision file: the type holding the most bytes."""
    from qvq_local.formats.gguf import file_type_value

    by_type: dict[str, int] = {}
    for t in plan:
        by_type[t.qtype] = by_type.get(t.qtype, 0) + t.nbytes
    return file_type_value(max(by_type, key=by_type.__getitem__))


def _check_disk(out_dir: Path, need: int) -> None:
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.02 + 64 * 1024 * 1024 > free:
        raise DiskFull(
            f"converting needs about {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free", path=probe
        )


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yield ``bar(label, total) -> advance(n)``; a Rich progress display on stderr when enabled."""
    if not enabled:
        yield lambda label, total: lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as prog:

        def bar(label: str, total: int) -> Callable[[int], None]:
            task = prog.add_task(label, total=total)
            return lambda n: prog.advance(task, n)

        yield bar
