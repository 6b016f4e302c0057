"""Write a file so that it is either complete or absent: a temporary sibling, then ``os.replace``.

Every small file qvq-local writes (settings, manifests, transcripts, bench JSON and charts) goes through
here, so none is ever left half-written by Ctrl-C, a full disk or a crash, and each gets the permissions
a plain ``open(path, "w")`` would give (``tempfile.mkstemp`` alone makes files readable by their owner
only).  Large model files stream through their own writers, which follow the same rule.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    ``suffix`` lets writers that pick a format from the name (matplotlib) see the right extension.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """A unique hidden sibling of ``out_dir`` to build a folder in before :func:`replace_dir`."""
    import uuid

    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace_dir(partial: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Move a finished folder onto ``out_dir``.  An existing output (``--force``) is moved aside first
    and deleted only once the new one is in place, so there is never a moment with no output at all."""
    import shutil
    import uuid

    partial, out_dir = Path(partial), Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(partial, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    os.replace(partial, out_dir)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
