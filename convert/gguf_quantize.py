"""Quantise a GGUF file with llama.cpp's own quantiser (through llama-cpp-python).

The quantiser runs in a child process (``python -m qvq_local.convert.gguf_quantize SRC DST FTYPE``):

* Ctrl-C works: a ctypes call cannot be interrupted from Python, a child process can be killed;
* llama.cpp's per-tensor log goes to a log file, shown only when quantisation fails;
* its memory is its own and is bounded with ``max_buf_size`` (rows are quantised in slabs of at most
  that many bytes; llama.cpp's default is 8 GiB).

K-quant widths not divisible by 256 fall back per tensor to another type; that is llama.cpp's policy.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qvq_local.convert.quants import GGUF_TYPES

from qvq_local.cpu import usable_cores
from qvq_local.errors import BackendUnavailable, ModelError

MAX_BUF_SIZE = 256 * 1024 * 1024


def check_quantiser_available() -> None:
    """Raise BackendUnavailable when llama-cpp-python (with its quantiser) cannot be imported."""
    try:
        import llama_cpp  # noqa: F401
        from llama_cpp import llama_model_quantize  # noqa: F401
    except (ImportError, OSError, AttributeError) as err:  # OSError: libllama cannot load
        raise BackendUnavailable(
            f"llama-cpp-python is needed to quantise GGUF files ({err})",
            hint="pip install 'qvq-local[llama]'",
        ) from None


def quantize_gguf(
    src: Path,
    dst: Path,
    quant: str,
    nthread: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    poll_s: float = 0.5,
) -> Path:
    """Quantise ``src`` into ``dst`` (overwritten) with llama.cpp; ``quant`` is a key of
    :data:`~qvq_local.convert.quants.GGUF_TYPES` (llama.cpp's file type for it is gguf-py's number).

    ``on_progress(bytes_written_so_far)`` is called while the child works.  Raises ModelError with the
    tail of llama.cpp's log when quantisation fails; on any exception ``dst`` is removed.
    """
    from qvq_local.formats.gguf import file_type_value

    if quant not in GGUF_TYPES:
        raise ValueError(f"unknown quant {quant!r}")
    label = GGUF_TYPES[quant].label
    ftype = file_type_value(label)
    nthread = nthread or usable_cores()
    cmd = [
        sys.executable,
        "-m",
        "qvq_local.convert.gguf_quantize",
        str(src),
        str(dst),
        str(ftype),
        str(nthread),
    ]
    with tempfile.TemporaryFile(mode="w+b") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if on_progress is not None:
                    try:
                        on_progress(dst.stat().st_size)
                    except FileNotFoundError:
                        pass
                time.sleep(poll_s)
        except BaseException:
            proc.kill()
            proc.wait()
            dst.unlink(missing_ok=True)
            raise
        if proc.returncode != 0:
            dst.unlink(missing_ok=True)
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            raise ModelError(
                f"llama.cpp could not quantise to {label} (exit {proc.returncode}: {' | '.join(tail)})",
                path=src,
            )
    if on_progress is not None:
        on_progress(dst.stat().st_size)
    return dst


def _child(src: str, dst: str, ftype: int, nthread: int) -> int:
    """Run in the child process: call llama_model_quantize with bounded buffers."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    if any(f[0] == "max_buf_size" for f in type(params)._fields_):
        params.max_buf_size = MAX_BUF_SIZE
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc != 0 else 0


if __name__ == "__main__":  # pragma: no cover - exercised through quantize_gguf
    a = sys.argv[1:]
    sys.exit(_child(a[0], a[1], int(a[2]), int(a[3])))
