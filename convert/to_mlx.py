"""Hugging Face checkpoint -> MLX folder, through ``mlx_vlm.convert``.

mlx-vlm does the real work (loading, quantising the language model, writing safetensors); this module
puts the project's guarantees around it:

* the source is validated first, so a wrong architecture or a missing shard fails with one line before
  anything is written;
* checkpoints in transformers 5's naming (``model.language_model.*``, ``model.visual.*``) are first
  staged under the family's original names (Qwen2-VL's), because mlx-vlm 0.7 only maps the original
  ones; likewise a config.json in transformers 5's spelling or tensors in its layout (what its
  ``save_pretrained`` writes for some families: ``Family.published_config``, ``Family.published_layout``)
  are staged in the published ones;
* the output is written into a hidden sibling folder and renamed into place at the very end, so a
  failure or Ctrl-C never leaves a folder that looks complete;
* mlx-vlm's own prints are captured and turned into a Rich spinner (stderr) that names the stage;
* no hub look-ups for local folders (``HF_HUB_OFFLINE``) and never remote code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.convert.quants import DEFAULT_BITS, DEFAULT_GROUP_SIZE, MLX_BITS, MLX_GROUP_SIZES

from qvq_local import atomic
from qvq_local.errors import BackendUnavailable, DiskFull, InputError, ModelError, QvqError
from qvq_local.families import Family
from qvq_local.formats.safetensors import INDEX_NAME

# Files a converted folder must hold; anything less is not a finished conversion.
_REQUIRED_OUTPUTS = ("config.json",)


# ----------------------------------------------------------------------------- public entry point
def convert_to_mlx(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    bits: int | None = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert the checkpoint folder ``src`` into an MLX folder ``out_dir``.

    ``bits`` is 4 or 8 for affine quantisation of the language model (the vision tower is never
    quantised by mlx-vlm), or ``None`` to keep the source dtype.  ``overwrite`` replaces an existing
    ``out_dir`` only once the new one is complete.  Returns ``out_dir``.
    """
    src = Path(src).expanduser()
    out_dir = Path(out_dir).expanduser()
    if bits is not None and bits not in MLX_BITS:
        raise InputError(f"--bits must be one of {', '.join(map(str, MLX_BITS))} (got {bits})")
    if group_size not in MLX_GROUP_SIZES:
        raise InputError(
            f"--group-size must be one of {', '.join(map(str, MLX_GROUP_SIZES))} (got {group_size})"
        )
    if out_dir.exists() and not overwrite:
        raise InputError("output already exists", path=out_dir, hint="use --force to replace it")

    family, plan, weight_files = validate_source(src)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(src, out_dir.parent, weight_files, bits, group_size, plan.needed, family)

    partial = atomic.partial_dir(out_dir)
    staging: Path | None = None
    try:
        with _Reporter(progress) as report:
            source_for_mlx = src
            if plan.needed:
                staging = partial.with_name(partial.name.replace(".partial-", ".staging-"))
                report.stage(f"Staging the checkpoint in the published {family.name} layout")
                stage_original_names(src, staging, weight_files, report, family, plan)
                source_for_mlx = staging
            report.stage("Loading")
            _run_mlx_vlm_convert(source_for_mlx, partial, bits, group_size, report)
            report.stage("Checking the output")
            _tidy_output(partial)
            _check_output(partial)
        atomic.replace_dir(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- source validation
@dataclass(frozen=True)
class StagingPlan:
    """What must change before mlx-vlm 0.7 can read a checkpoint: the tensor names (transformers 5's ->
    the family's original ones), config.json (rewritten in the published spelling; None: as it is), and
    tensors stored in another layout (stored name -> the transpose axes to the published one)."""

    rename: bool = False
    config: dict[str, Any] | None = None
    transposes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def needed(self) -> bool:
        return self.rename or self.config is not None or bool(self.transposes)


def validate_source(src: Path) -> tuple[Family, StagingPlan, list[Path]]:
    """Validate ``src`` with the project's checkpoint checks; return (its family, what to stage, weight
    files).

    ``open_checkpoint`` checks config, architecture, shards, truncation and every tensor's shape
    against the config, so a bad source fails here, before any output exists.
    """
    from qvq_local.convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    try:
        family = ckpt.family
        published = family.published_config(ckpt.config)
        layout = family.published_layout(ckpt.text, {n: ckpt.shape(n) for n in ckpt.names})
        plan = StagingPlan(
            rename=ckpt.naming == "transformers5",
            config=published if published != ckpt.config else None,
            transposes={ckpt.stored_name(n): axes for n, axes in layout.items()},
        )
        return family, plan, list(ckpt.shards)
    finally:
        ckpt.release()


def estimate_output_bytes(
    src: Path, weight_files: list[Path], bits: int | None, group_size: int, family: Family | None = None
) -> int:
    """Rough size of the MLX output, from the safetensors headers only.

    Unquantised: the source size.  Quantised: each 2-D language-model weight costs ``bits/8`` per value
    plus a scale and a bias per group in the source dtype; the vision tower, norms and biases stay as
    they are (mlx-vlm never quantises the vision tower).  ``family``: the checkpoint's (None: read from
    its config.json).
    """
    if bits is None:
        return sum(p.stat().st_size for p in weight_files)
    from qvq_local.convert.checkpoint import checkpoint_family

    from qvq_local.formats.safetensors import SafetensorsFile

    family = family or checkpoint_family(src)

    total = 0
    for path in weight_files:
        st = SafetensorsFile(path)
        try:
            sizes = {name: (st.nbytes(name), st.shape(name)) for name in st}
        finally:
            st.close()
        for name, (nbytes, shape) in sizes.items():
            original = family.original_tensor_name(name)
            if family.is_vision_tensor(original) or len(shape) != 2 or shape[-1] % group_size:
                total += nbytes
            else:
                numel = shape[0] * shape[1]
                itemsize = nbytes // max(numel, 1)
                total += int(numel * bits / 8 + 2 * itemsize * numel / group_size)
    return total


def _check_disk(
    src: Path,
    parent: Path,
    weight_files: list[Path],
    bits: int | None,
    group_size: int,
    staging: bool,
    family: Family,
) -> None:
    need = estimate_output_bytes(src, weight_files, bits, group_size, family)
    if staging:
        need += sum(p.stat().st_size for p in weight_files)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise DiskFull(
            f"the MLX conversion needs about {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free",
            path=parent,
        )


# ----------------------------------------------------------------------------- renamed staging copy
def stage_original_names(
    src: Path,
    staging: Path,
    weight_files: list[Path],
    report: _Reporter,
    family: Family,
    plan: StagingPlan | None = None,
) -> None:
    """Write a copy of ``src`` whose safetensors use the family's original names, in the layout ``plan``
    asks for (its config.json, its transposed tensors).

    The headers change; each file's data section is streamed byte for byte after the rewritten header,
    except a tensor to transpose, which is rewritten one block of its first axis at a time (transposes
    keep that axis), so memory stays bounded and dtypes (bf16 included) are untouched.  Other files are
    symlinked.
    """
    plan = plan or StagingPlan(rename=True)
    staging.mkdir(parents=True)
    weight_names = {p.name for p in weight_files}
    for item in src.iterdir():
        if item.name in weight_names or item.name == INDEX_NAME or item.is_dir():
            continue
        if item.name == "config.json" and plan.config is not None:
            (staging / item.name).write_text(json.dumps(plan.config, indent=2) + "\n", encoding="utf-8")
            continue
        (staging / item.name).symlink_to(item.resolve())

    index = src / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {family.original_tensor_name(k): v for k, v in data["weight_map"].items()}
        (staging / index.name).write_text(json.dumps(data, indent=2), encoding="utf-8")

    total = sum(p.stat().st_size for p in weight_files)
    report.start_bytes(total)
    for path in weight_files:
        _copy_renamed(path, staging / path.name, report, family, plan.transposes)
    report.stop_bytes()


def _copy_renamed(
    path: Path,
    dest: Path,
    report: _Reporter,
    family: Family,
    transposes: dict[str, tuple[int, ...]] | None = None,
) -> None:
    transposes = transposes or {}
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        turned = {k: v for k, v in header.items() if k in transposes}
        for k, v in turned.items():
            header[k] = {**v, "shape": [v["shape"][a] for a in transposes[k]]}
        renamed = {
            (k if k == "__metadata__" else family.original_tensor_name(k)): v for k, v in header.items()
        }
        blob = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
        with open(dest, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            report.advance_bytes(8 + header_len)
            if turned:
                _copy_transposing(fh, out, 8 + header_len, turned, transposes, report)
                return
            while True:
                chunk = fh.read(16 << 20)
                if not chunk:
                    break
                out.write(chunk)
                report.advance_bytes(len(chunk))


# ----------------------------------------------------------------------------- running mlx-vlm
def _run_mlx_vlm_convert(src: Path, dest: Path, bits: int | None, group_size: int, report: _Reporter) -> None:
    try:
        with _hub_offline():
            from mlx_vlm import convert as mlx_convert
    except ImportError as err:
        raise BackendUnavailable(
            f"mlx-vlm is not installed ({err})", hint="pip install 'qvq-local[mlx]'"
        ) from None

    sink = _StageSink(report)
    try:
        with _hub_offline(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            mlx_convert(
                str(src),
                mlx_path=str(dest),
                quantize=bits is not None,
                q_bits=bits if bits is not None else 4,
                q_group_size=group_size,
                trust_remote_code=False,
            )
    except (KeyboardInterrupt, SystemExit, QvqError):
        raise
    except MemoryError:
        raise ModelError("out of memory while converting to MLX", path=src) from None
    except OSError as err:
        if _is_disk_full_errno(err.errno):
            where = Path(err.filename).name if err.filename else "the MLX conversion"
            raise DiskFull(
                f"ran out of space writing {where} ({err.strerror or err}); nothing was kept", path=dest
            ) from None
        raise ModelError(f"MLX conversion failed: {err}", path=src) from None
    except RuntimeError as err:
        if _is_mlx_write_failure(err):
            raise DiskFull(
                f"ran out of space writing the MLX conversion ({err}); nothing was kept",
                path=dest,
            ) from None
        raise ModelError(f"MLX conversion failed: {_describe(err, sink)}", path=src) from None
    except Exception as err:  # noqa: BLE001 - mlx-vlm raises ValueError/KeyError/... for bad checkpoints
        raise ModelError(f"MLX conversion failed: {_describe(err, sink)}", path=src) from None


def _copy_transposing(
    fh: Any,
    out: Any,
    data_start: int,
    turned: dict[str, Any],
    transposes: dict[str, tuple[int, ...]],
    report: _Reporter,
) -> None:
    """Copy a safetensors data section from ``fh`` to ``out``, transposing the tensors ``turned`` (their
    header entries, as stored) by ``transposes``: byte ranges copied as they are around them, each of them
    rewritten one block of its first axis at a time (a transpose here keeps the first axis)."""
    import numpy as np

    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    bits = {4: np.uint32, 2: np.uint16}
    pos = 0
    for name, entry in sorted(turned.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = entry["data_offsets"]
        _copy_bytes(fh, out, data_start + pos, start - pos, report)
        shape, axes = entry["shape"], transposes[name]
        if axes[0] != 0:  # pragma: no cover - a family's mistake
            raise ValueError(f"{name}: the transpose {axes} moves the first axis")
        size = itemsize[entry["dtype"]]
        row = size * math.prod(shape[1:])
        fh.seek(data_start + start)
        step = max(1, (64 << 20) // max(1, row))
        for first in range(0, shape[0], step):
            n = min(step, shape[0] - first)
            block = np.frombuffer(fh.read(n * row), dtype=bits[size]).reshape(n, *shape[1:])
            out.write(np.ascontiguousarray(block.transpose(axes)).tobytes())
            report.advance_bytes(n * row)
        pos = stop
    fh.seek(0, 2)
    _copy_bytes(fh, out, data_start + pos, fh.tell() - data_start - pos, report)


def _copy_bytes(fh: Any, out: Any, offset: int, count: int, report: _Reporter) -> None:
    fh.seek(offset)
    while count > 0:
        chunk = fh.read(min(count, 16 << 20))
        if not chunk:
            raise ModelError("the file ended early while staging it", path=Path(fh.name))
        out.write(chunk)
        count -= len(chunk)
        report.advance_bytes(len(chunk))


def _describe(err: BaseException, sink: _StageSink) -> str:
    detail = f"{type(err).__name__}: {err}"
    last = sink.last_line()
    if last:
        detail += f" (last mlx-vlm message: {last})"
    return detail


def _is_disk_full_errno(code: int | None) -> bool:
    import errno

    return code is not None and code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1))


def _is_mlx_write_failure(err: RuntimeError) -> bool:
    """mlx's C++ writer reports a failed write (full disk, file size limit) as a RuntimeError such as
    ``[write] Unable to write 1048576 bytes to file.``, never as an OSError with an errno."""
    text = str(err)
    return "[write]" in text or "unable to write" in text.lower()


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid hub look-ups while mlx-vlm and transformers read a local folder.

    huggingface_hub reads ``HF_HUB_OFFLINE`` when it is imported, so the already-imported constant is
    patched too, and both are restored afterwards.
    """
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None) if constants else None
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_const


def _tidy_output(dest: Path) -> None:
    """Drop what mlx-vlm copied from the source but a converted model does not need."""
    for junk in (".cache", "qvq-manifest.json"):
        target = dest / junk
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()


def _check_output(dest: Path) -> None:
    for name in _REQUIRED_OUTPUTS:
        if not (dest / name).is_file():
            raise ModelError(f"mlx-vlm wrote no {name}", path=dest)
    if not any(dest.glob("*.safetensors")):
        raise ModelError("mlx-vlm wrote no weights", path=dest)


# ----------------------------------------------------------------------------- progress display
class _Reporter:
    """A Rich spinner (stage + elapsed) and, for the staging copy, a byte bar; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._stage_task = None
        self._bytes_task = None
        self._bytes_total = self._bytes_done = 0
        self.stages: list[str] = []

    def __enter__(self) -> _Reporter:  # noqa: PYI034
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            # Bind the real stderr now: mlx-vlm's prints are redirected later and must not eat the bar.
            console = Console(file=sys.stderr)
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]MLX[/bold] {task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._progress.start()
            self._stage_task = self._progress.add_task("starting", total=None, detail="")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            if exc_type is None:
                self._progress.update(
                    self._stage_task, description="conversion written", total=1, completed=1
                )
            self._progress.stop()

    def stage(self, text: str) -> None:
        self.stages.append(text)
        if self._progress is not None:
            self._progress.update(self._stage_task, description=text)

    def start_bytes(self, total: int) -> None:
        if self._progress is not None:
            self._bytes_task = self._progress.add_task("renaming tensors", total=total, detail="")
            self._bytes_total, self._bytes_done = total, 0

    def advance_bytes(self, n: int) -> None:
        if self._progress is not None and self._bytes_task is not None:
            self._bytes_done += n
            self._progress.update(
                self._bytes_task,
                completed=self._bytes_done,
                detail=f"{self._bytes_done / 1e9:.2f} / {self._bytes_total / 1e9:.2f} GB",
            )

    def stop_bytes(self) -> None:
        if self._progress is not None and self._bytes_task is not None:
            self._progress.remove_task(self._bytes_task)
            self._bytes_task = None


class _StageSink(io.TextIOBase):
    """A text stream that swallows mlx-vlm's output and reports its ``[INFO] ...`` lines as stages."""

    def __init__(self, report: _Reporter):
        self._report = report
        self._buffer = ""
        self._lines: list[str] = []
        self._started = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            line = line.strip()
            if not line:
                continue
            self._lines = (self._lines + [line])[-50:]
            if line.startswith("[INFO]"):
                self._report.stage(line[len("[INFO]") :].strip().rstrip(":"))
        return len(text)

    def last_line(self) -> str:
        lines = self._lines + ([self._buffer.strip()] if self._buffer.strip() else [])
        return lines[-1] if lines else ""
