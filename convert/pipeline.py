"""``qvq convert``: one command from a Hugging Face checkpoint (folder or hub id) to MLX or GGUF.

The orchestration only: check the option combination, get the source (downloading a hub id with
:func:`qvq_local.hub.resolve`), pick the output folder, run the format's converter into a hidden
partial folder, write the manifest there, and rename the folder into place last.  A folder with a
manifest is therefore always a finished conversion, and a failure or Ctrl-C leaves nothing that looks
complete (the partial folder is removed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Union

from qvq_local.convert.quants import (
    DEFAULT_BITS,
    DEFAULT_GGUF_QUANT,
    DEFAULT_GROUP_SIZE,
    DEFAULT_MMPROJ_QUANT,
    GGUF_QUANTS,
    MLX_BITS,
    MMPROJ_QUANTS,
    NO_BITS,
)

from qvq_local import atomic
from qvq_local.errors import DiskFull, InputError, ModelError, QvqError

FORMATS = ("mlx", "gguf")
#: --bits words that keep the source dtype (besides none)
_NO_BITS_WORDS = (NO_BITS, "no", "0", "16", "f16", "bf16", "f32", "unquantised", "unquantized")

Bits = Union[int, str, None]  # noqa: UP007 - a runtime alias must work on Python 3.10


def default_target() -> str:
    """The format this machine's backend runs: MLX on Apple Silicon, GGUF elsewhere."""
    from qvq_local.hardware import default_convert_target

    return default_convert_target()


def parse_bits(bits: Bits) -> int | None:
    """:data:`~qvq_local.convert.quants.MLX_BITS` quantise; ``"none"``/``0``/``16`` keep the source dtype
    (returns ``None``)."""
    allowed = f"{', '.join(map(str, MLX_BITS))} or {NO_BITS}"
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text in _NO_BITS_WORDS:
            return None
        if not text.isdigit():
            raise InputError(f"--bits must be {allowed} (got {bits!r})")
        bits = int(text)
    if bits in (0, 16):
        return None
    if bits not in MLX_BITS:
        raise InputError(f"--bits must be {allowed} (got {bits!r})")
    return int(bits)


def convert(
    source: str | os.PathLike,
    to: str | None = None,
    quant: str | None = None,
    bits: Bits = None,
    group_size: int | None = None,
    mmproj_quant: str | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``source`` and return the output folder (which holds ``qvq-manifest.json``).

    Options left as ``None`` take the format's defaults (GGUF: ``q4_k_m`` with an ``f16`` projector;
    MLX: 4 bits, group size 64).  GGUF options with ``--to mlx`` (and the reverse) are refused, so a
    flag is never silently ignored.
    """
    fmt = (to or default_target()).strip().lower()
    if fmt not in FORMATS:
        raise InputError(f"--to must be mlx or gguf (got {to!r})")
    if fmt == "mlx":
        if quant is not None:
            raise InputError("--quant is for --to gguf; for MLX use --bits 4|8|none and --group-size")
        if mmproj_quant is not None:
            raise InputError("--mmproj-quant is for --to gguf (MLX keeps the vision tower unquantised)")
        qbits = parse_bits(DEFAULT_BITS if bits is None else bits)
        gsize = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
    else:
        if bits is not None or group_size is not None:
            raise InputError("--bits/--group-size are for --to mlx; for GGUF use --quant")
        quant = (quant or DEFAULT_GGUF_QUANT).lower()
        mmproj_quant = (mmproj_quant or DEFAULT_MMPROJ_QUANT).lower()
        if quant not in GGUF_QUANTS:
            raise InputError(f"--quant must be one of {', '.join(GGUF_QUANTS)} (got {quant!r})")
        if mmproj_quant not in MMPROJ_QUANTS:
            choices = ", ".join(MMPROJ_QUANTS)
            raise InputError(f"--mmproj-quant must be one of {choices} (got {mmproj_quant!r})")

    src, source_label, source_name = _source_folder(source, progress)

    if fmt == "mlx":
        if qbits is not None:
            label = f"{qbits}bit"
            quantization = f"{qbits}bit-g{gsize}"
        else:
            from qvq_local.models import hf_dtype

            label = quantization = hf_dtype(src)
    else:
        label = quantization = quant

    if out is None:
        from qvq_local.models import models_dir

        out_dir = models_dir() / f"{source_name}-{fmt}-{label}"
    else:
        out_dir = Path(out).expanduser()
    if out_dir.resolve() == src.resolve():
        raise InputError("output folder is the source folder", path=out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # one run per output at a time: a second one fails here at once, naming the first one's pid (before
    # the exists check, so it is not told to pass --force, which would not help while the first runs)
    with atomic.output_lock(out_dir):
        if out_dir.exists() and not force:
            raise InputError("output already exists", path=out_dir, hint="pass --force to replace it")
        partial = atomic.partial_dir(out_dir)
        try:
            if fmt == "mlx":
                from qvq_local.convert.to_mlx import convert_to_mlx

                convert_to_mlx(src, partial, bits=qbits, group_size=gsize, progress=progress)
                manifest = _manifest(
                    partial,
                    out_dir.name,
                    source_label,
                    "mlx",
                    quantization,
                    extra={
                        "bits": qbits,
                        "group_size": gsize if qbits else None,
                        "mlx_vlm_version": _version("mlx-vlm"),
                    },
                )
            else:
                from qvq_local.convert.to_gguf import convert_to_gguf

                pair = convert_to_gguf(
                    src, partial, quant=quant, mmproj_quant=mmproj_quant, progress=progress
                )
                # The GGUF carries the sampling defaults (general.sampling.*); the model's own
                # generation_config.json stays beside it too, whole, for tools that read only that file.
                if (src / "generation_config.json").is_file():
                    shutil.copyfile(src / "generation_config.json", partial / "generation_config.json")
                manifest = _manifest(
                    partial,
                    out_dir.name,
                    source_label,
                    "gguf",
                    quantization,
                    model_file=Path(pair.model).name,
                    mmproj_file=Path(pair.mmproj).name,
                    extra={"mmproj_quant": mmproj_quant, "gguf_version": _version("gguf")},
                )
            from qvq_local.formats.manifest import write_manifest

            write_manifest(partial, manifest)
            atomic.replace_dir(partial, out_dir)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise _write_error(err, out_dir, fmt) from None
        except QvqError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise _named_after_output(err, partial, out_dir) from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return out_dir


def _named_after_output(err: QvqError, partial: Path, out_dir: Path) -> QvqError:
    """A converter's error that names a file inside the (now removed) hidden partial folder names the
    output the user asked for instead."""
    if not err.path or str(partial) not in err.path:
        return err
    renamed = type(err)(str(err).replace(err.path, str(out_dir), 1))
    renamed.path = str(out_dir)
    return renamed


def _write_error(err: OSError, out_dir: Path, fmt: str) -> ModelError | DiskFull:
    """A failed write as one user-facing line: a full disk (or a file size limit) is DiskFull.

    The converters stream gigabytes; without this a full disk surfaced as a traceback from deep inside
    the writer.  The partial folder is already gone when this is raised.
    """
    import errno

    where = Path(err.filename).name if err.filename else f"the {fmt.upper()} conversion"
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return DiskFull(f"ran out of space writing {where} ({reason}); nothing was kept", path=out_dir)
    target = err.filename or where  # may be a source file (unreadable) as well as an output file
    return ModelError(f"conversion failed on {target} ({reason}); nothing was kept", path=out_dir)


def _source_folder(source: str | os.PathLike, progress: bool) -> tuple[Path, str, str]:
    """(local folder, label for the manifest, short name for the output folder).

    A local folder is taken as it is: the checkpoint reader judges it, with messages more precise than
    the resolver's (only pickle weights, no config.json), after a converted model is refused here.  A hub
    id goes through the one resolver, :func:`qvq_local.hub.resolve`, which reuses a finished download
    or pulls it.  Names from ``qvq models`` are converted models, so they are not sources.
    """
    from qvq_local import hub, models
    from qvq_local.formats.manifest import read_manifest

    text = str(source).strip()
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError("SOURCE must be a Hugging Face checkpoint folder or a hub id", path=path)
        manifest = read_manifest(path)
        _refuse_converted(path, manifest)
        label = (manifest or {}).get("source") or str(path.resolve())
        name = label.split("/")[-1] if manifest else path.resolve().name
        return path, label, name
    if text.startswith((".", "~", os.sep)) or text.count("/") != 1:
        raise ModelError("no such folder (and not an owner/name hub id)", path=text)
    hub_id = models.check_hub_id(text)
    resolved = hub.resolve(hub_id, download=True, progress=progress)
    _refuse_converted(resolved.path, resolved.manifest)
    if resolved.format != "hf":  # a GGUF or MLX repo from the hub: nothing to convert
        raise InputError(
            f"already a quantised {resolved.format} model",
            path=resolved.path,
            hint=f"run it as it is: qvq ask IMAGE QUESTION -m {hub_id}",
        )
    return resolved.path, hub_id, hub_id.split("/")[1]


def _refuse_converted(path: Path, manifest: dict | None) -> None:
    if manifest is not None and manifest.get("format") in ("mlx", "gguf"):
        raise InputError(
            f"already a converted {manifest['format']} model",
            path=path,
            hint="convert from the original Hugging Face checkpoint",
        )


def _manifest(folder: Path, name: str, source: str, fmt: str, quantization: str, **kwargs) -> dict:
    from qvq_local.formats.manifest import build_manifest

    return build_manifest(folder, source=source, format=fmt, quantization=quantization, name=name, **kwargs)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - a version is informative only
        return None
