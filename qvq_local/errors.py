"""The one exception type users see.

Every failure a user can cause (a bad image, a missing shard, a model of the wrong format, a missing
backend) raises :class:`QvqError` with a one-line message that names the file and what is wrong.  The CLI
prints ``error: <message>`` and exits with ``exit_code``; it never prints a traceback for these.
Anything else that escapes is a bug in qvq-local.
"""

from __future__ import annotations

from pathlib import Path


class QvqError(Exception):
    """A user-facing error: one line, names the thing and the problem."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        text = f"{path}: {message}" if path is not None else message
        if hint:
            text = f"{text} ({hint})"
        # keep it to one line whatever the caller passed
        super().__init__(" ".join(text.split()))

    @property
    def message(self) -> str:
        return str(self)


class InputError(QvqError):
    """Bad input named by the user: an image, a question, an option value."""

    exit_code = 2


class ModelError(QvqError):
    """A model reference that cannot be resolved, is incomplete, corrupt or unsupported."""

    exit_code = 3


class BackendUnavailable(QvqError):
    """The chosen backend's library is not installed or cannot run here."""

    exit_code = 4


class MediaTooLarge(InputError):
    """An image or clip over a size limit (pixels, duration, frames), found from its header before it is
    decoded: ``qvq serve`` answers 413 for it."""


class ContextOverflow(InputError):
    """The prompt plus image tokens (plus budgets) do not fit the model's context."""


class DiskFull(QvqError):
    """Not enough room on disk for what was asked."""

    exit_code = 5
