"""The earlier turns of a conversation, and the rules a conversation must keep.

A chat front-end (Open WebUI, LibreChat, the openai client in a loop) sends the whole conversation every
turn.  ``qvq serve`` and :meth:`qvq_local.api.Model.stream` take those earlier turns as a ``history`` of
:class:`Turn`; the new question (and its images) is asked after them.  QVQ-72B-Preview's model card says it
was trained for single-round dialogue: the turns are rendered through the model's own chat template and
answered anyway, with that caveat in the README.

The rules, each broken one refused with a one-line :class:`~qvq_local.errors.InputError` naming the turn:
a turn is a user's or the assistant's; a user turn holds text, images or both; an assistant turn holds
text and no image.  No heavy imports here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qvq_local.errors import InputError

USER = "user"
ASSISTANT = "assistant"
ROLES = (USER, ASSISTANT)


@dataclass(frozen=True)
class Turn:
    """One earlier turn: a user's message (``text`` and ``images``) or the assistant's reply (``text``).

    ``images``: a user turn's images, in order: paths, or images the caller has already prepared
    (:class:`qvq_local.api.PreparedImage`; ``qvq serve`` passes those).  An assistant turn's ``text`` may
    be its whole reply: only its answer is shown to the model again (its reasoning is dropped, as Qwen's
    templates drop it; :meth:`qvq_local.api.Model.stream` does this).
    """

    role: str
    text: str = ""
    images: tuple = ()

    @classmethod
    def user(cls, text: str = "", images: Iterable = ()) -> Turn:
        return cls(USER, text, tuple(images))

    @classmethod
    def assistant(cls, text: str) -> Turn:
        return cls(ASSISTANT, text)


def _as_turn(item: object, name: str) -> Turn:
    if isinstance(item, Turn):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - {"role", "text", "content", "images"}
        if unknown:
            raise InputError(
                f"{name}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (a turn has role, text, images)"
            )
        text = item.get("text", item.get("content", ""))
        images = item.get("images") or ()
        if isinstance(images, (str, Path)):
            images = (images,)
        return Turn(item.get("role"), text, tuple(images))  # type: ignore[arg-type]
    raise InputError(
        f"{name} must be a Turn (or a dict with role, text and images), got {type(item).__name__}"
    )


def check_history(history: Iterable | None, names: Sequence[str] | None = None) -> tuple[Turn, ...]:
    """The turns of ``history`` (:class:`Turn` or dicts with ``role``, ``text``, ``images``), checked.

    ``names``: how each turn is named in errors (default ``history[i]``; ``qvq serve`` passes the
    request's ``messages[i]``).  Raises ``InputError`` for a turn that breaks the module's rules.
    """
    if history is None:
        return ()
    if isinstance(history, (str, bytes, Mapping, Turn)):
        raise InputError("history must be a list of turns")
    turns = []
    for i, item in enumerate(history):
        name = names[i] if names is not None else f"history[{i}]"
        turn = _as_turn(item, name)
        if turn.role not in ROLES:
            raise InputError(f"{name}: a turn's role is user or assistant, got {turn.role!r}")
        if not isinstance(turn.text, str):
            raise InputError(f"{name}: the text must be a string, got {type(turn.text).__name__}")
        if turn.role == ASSISTANT and turn.images:
            raise InputError(f"{name}: an assistant turn cannot hold images (they belong in user turns)")
        if turn.role == ASSISTANT and not turn.text.strip():
            raise InputError(f"{name}: the assistant turn is empty")
        if turn.role == USER and not turn.text.strip() and not turn.images:
            raise InputError(f"{name}: the user turn is empty (no text and no image)")
        turns.append(turn)
    return tuple(turns)


def image_count(history: Sequence[Turn]) -> int:
    return sum(len(turn.images) for turn in history)


__all__ = ["ASSISTANT", "ROLES", "USER", "Turn", "check_history", "image_count"]
