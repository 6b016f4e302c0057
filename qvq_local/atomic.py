"""Write a file so that it is either complete or absent: a temporary sibling, then ``os.replace``.

Every small file qvq-local writes (settings, manifests, transcripts, bench JSON and charts) goes through
here, so none is ever left half-written by Ctrl-C, a full disk or a crash, and each gets the permissions
a plain ``open(path, "w")`` would give (``tempfile.mkstemp`` alone makes files readable by their owner
only).  Large model files stream through their own writers, which follow the same rule.  A folder built
by a long run is claimed first with :func:`output_lock`, so two runs never build the same one at once.
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


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an OS lock on the output ``out_dir`` while a run builds it; a second run fails at once.

    The lock is ``fcntl.flock`` on a hidden file beside the output (``.NAME.lock``, holding the holder's
    pid), so the OS drops it when the process ends, however it ends: a crashed or killed run leaves nothing
    stuck (at most the file, which the next run locks again).  The file is removed when the lock is given
    back.  The parent folder must exist.  Raises :class:`qvq_local.errors.InputError` naming the output and
    the other run's pid.  Where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    from qvq_local.errors import InputError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms qvq-local runs
        yield
        return
    out_dir = Path(out_dir)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _default_mode())
        except OSError as err:
            raise InputError(f"cannot lock the output ({err.strerror or err})", path=out_dir) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise InputError(
                f"another run (pid {holder}) is writing this output now; wait for it to end", path=out_dir
            ) from None
        # a run that just finished may have removed the file between our open and flock (and a third may
        # have made a new one): the lock counts only on the file that is still in place
        try:
            current = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still holding it: a run waiting on this file sees it gone, retries
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """The pid written in a lock file (it may take the holder a moment to write it)."""
    import time

    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.025)
    return "unknown"
