"""huggingface_hub's calls and the file transfers behind :mod:`qvq_local.hub`: where the cache is, the
repo listing, resumable sha256-verified LFS downloads, the snapshot, the progress bars, and every
failure as one line.

LFS files (the weights) are fetched by :func:`fetch_lfs` into ``blobs/<sha256>`` under huggingface_hub's
lock, resuming with a Range request from qvq's own ``<sha256>.qvq-partial`` (huggingface_hub 2.4 resumes a
dropped connection within one run but deletes its partial file when the run fails or is interrupted), and
checked against the hub's sha256 before they enter the cache (a corrupt file is deleted and the error says
so); then :func:`download_snapshot` (huggingface_hub's ``snapshot_download``) fetches the small files and
links the snapshot.  What to fetch, and when, is :mod:`qvq_local.hub`'s.

huggingface_hub is imported only inside functions.  The endpoint, cache and offline switch are read from
the environment on each call (huggingface_hub reads them once, at import).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvq_local.errors import DiskFull, ModelError
from qvq_local.units import file_size


# ----------------------------------------------------------------------------- environment
def cache_dir() -> Path:
    """huggingface_hub's cache folder, as it computes it: HF_HUB_CACHE, else HF_HOME/hub, else XDG/default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


# ----------------------------------------------------------------------------- repo listings
@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files only (the hub's metadata)


def repo_cache(repo_id: str) -> Path:
    """A repo's folder in the cache (``models--owner--name``: blobs, refs, snapshots)."""
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


# ----------------------------------------------------------------------------- calls
def list_repo(repo_id: str, revision: str | None = None) -> tuple[str, list[RepoFile]]:
    """(commit, files with sizes and LFS sha256) from the hub's repo info."""
    from huggingface_hub import HfApi

    info = _call(
        repo_id,
        lambda: HfApi(endpoint=endpoint(), token=_token()).model_info(
            repo_id, revision=revision, files_metadata=True
        ),
    )
    files = [
        RepoFile(
            s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0) or 0), s.lfs.sha256 if s.lfs else None
        )
        for s in (info.siblings or [])
    ]
    return str(info.sha or revision or "main"), files


def _call(repo_id: str, fn):
    """A huggingface_hub call whose failures become one-line ``ModelError``s."""
    if offline():
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE to download it",
        )
    try:
        return fn()
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - network, HTTP, offline mode, disk: all user-facing
        kind = type(err).__name__
        first = (str(err).strip().splitlines() or [""])[0][:200]
        if kind == "GatedRepoError":
            raise ModelError(
                f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN (or `hf auth login`)"
            ) from None
        if kind == "RepositoryNotFoundError":
            raise ModelError(
                f"{repo_id}: not found on the hub, or private",
                hint="check the id; for a private or gated repo set HF_TOKEN (or `hf auth login`)",
            ) from None
        if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            raise ModelError(f"{repo_id}: a file in its listing is missing on the hub") from None
        if kind == "RevisionNotFoundError":
            raise ModelError(f"{repo_id}: no such revision") from None
        if kind == "OfflineModeIsEnabled" or "offline" in first.lower():
            raise ModelError(f"{repo_id}: cannot download, offline mode is on (HF_HUB_OFFLINE)") from None
        if isinstance(err, OSError) and getattr(err, "errno", None) == errno.ENOSPC:
            raise DiskFull(f"no space left while downloading {repo_id}", path=cache_dir()) from None
        raise ModelError(f"{repo_id}: download failed ({kind}: {first})") from None


# ----------------------------------------------------------------------------- progress bars
class progress_bars:
    """A Rich-drawing tqdm class for huggingface_hub (``None``: its bars switched off)."""

    def __init__(self, repo_id: str, show: bool):
        self._rich = _rich_download_progress(repo_id) if show else None

    def __enter__(self):
        if self._rich is not None:
            return self._rich.__enter__()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        return None

    def __exit__(self, *exc):
        if self._rich is not None:
            return self._rich.__exit__(*exc)
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
        return None


class _rich_download_progress:
    """Context manager giving a tqdm class that draws huggingface_hub's bars with Rich on stderr."""

    def __init__(self, hub_id: str):
        self.hub_id = hub_id
        self._progress = None

    def __enter__(self):
        import io
        import sys

        from huggingface_hub.utils import tqdm as hf_tqdm
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
        )
        self._progress = progress
        progress.start()
        hub_id = self.hub_id

        class RichTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
            """Keeps tqdm's counting, replaces its drawing with a Rich task."""

            def __init__(self, *args, **kwargs):
                self._task = None
                kwargs["file"] = io.StringIO()
                kwargs.setdefault("disable", False)
                if kwargs.get("disable") is None:
                    kwargs["disable"] = False
                super().__init__(*args, **kwargs)
                if not self.disable:
                    self._task = progress.add_task(
                        f"{hub_id}: {self.desc or ''}".rstrip(": "), total=self.total or None, detail=""
                    )
                    self.display()

            def display(self, msg=None, pos=None):
                task = getattr(self, "_task", None)
                if task is None:
                    return True
                total = self.total or None
                if self.unit == "B":
                    detail = file_size(self.n) + (f" / {file_size(total)}" if total else "")
                else:
                    detail = f"{int(self.n)}" + (f" / {int(total)}" if total else "") + " files"
                progress.update(
                    task,
                    completed=self.n,
                    total=total,
                    detail=detail,
                    description=f"{hub_id}: {self.desc or ''}".rstrip(": "),
                )
                return True

        return RichTqdm

    def __exit__(self, exc_type, exc, tb):
        if self._progress is not None:
            self._progress.stop()


# ----------------------------------------------------------------------------- transfers
def partial_path(blobs: Path, f: RepoFile) -> Path:
    # our own stable name: huggingface_hub 2.4 deletes its partial file on any failure (a unique name per
    # try), so an interrupted download would start again from zero
    return blobs / f"{f.sha256}.qvq-partial"


def fetch_lfs(repo_id: str, commit: str, f: RepoFile, tqdm_class) -> None:
    """One LFS file into ``blobs/<sha256>``, resumable (Range from the partial file) and verified.

    The blob is named by its sha256 as huggingface_hub names it, so its ``snapshot_download`` then only
    links it into the snapshot.  A file whose sha256 differs from the hub's is deleted.
    """
    from huggingface_hub.utils import WeakFileLock

    assert f.sha256
    blobs = repo_cache(repo_id) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    # huggingface_hub's own lock for this blob: another qvq, or another tool, fetching it waits
    lock = cache_dir() / ".locks" / repo_cache(repo_id).name / f"{f.sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not (blobs / f.sha256).is_file():
            _fetch_lfs_locked(repo_id, commit, f, tqdm_class, blobs)


def _fetch_lfs_locked(repo_id: str, commit: str, f: RepoFile, tqdm_class, blobs: Path) -> None:
    from urllib.parse import urlsplit

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = partial_path(blobs, f)
    url = hf_hub_url(repo_id, f.path, revision=commit, endpoint=endpoint())
    meta = _call(repo_id, lambda: get_hf_file_metadata(url, token=_token(), endpoint=endpoint()))
    headers = build_hf_headers(token=_token())
    if urlsplit(meta.location)[:2] != urlsplit(endpoint())[:2]:
        headers.pop("authorization", None)  # a CDN's signed URL: the token stays on the hub
    have = partial.stat().st_size if partial.is_file() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    with open(partial, "ab") as fh:
        _call(
            repo_id,
            lambda: http_get(
                meta.location,
                fh,
                resume_size=have,
                headers=headers,
                expected_size=f.size,
                displayed_filename=f.path,
                tqdm_class=tqdm_class,
            ),
        )
    if sha256_file(partial) != f.sha256:
        partial.unlink(missing_ok=True)
        raise ModelError(
            f"{repo_id}: {f.path} failed the sha256 check against the hub (corrupt download); deleted it",
            hint="run the command again to download it again",
        )
    os.replace(partial, blobs / f.sha256)


def download_snapshot(repo_id: str, paths: list[str], revision: str, tqdm_class) -> Path:
    """huggingface_hub's own download of ``paths``: small files, the snapshot's links, ``refs/<revision>``."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": [_escape_glob(p) for p in paths],
        "cache_dir": str(cache_dir()),
        "endpoint": endpoint(),
        "token": _token(),
    }
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    return Path(_call(repo_id, lambda: snapshot_download(**kwargs)))


def download_file(repo_id: str, filename: str, revision: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        _call(
            repo_id,
            lambda: hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=str(cache_dir()),
                endpoint=endpoint(),
                token=_token(),
            ),
        )
    )


def _escape_glob(path: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
