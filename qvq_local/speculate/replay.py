"""Replaying real reasoning text through the speculator: how often would its guesses have been right?

A random synthetic model writes loops, not reasoning, so its acceptance says nothing about a real QVQ.
A replay takes text a real model wrote (QVQ-72B-Preview's published replies, :data:`PUBLISHED_REPLIES`)
and makes it the "sampled" output: at every position the token the reply has is the one emitted, and
the speculator drafts and checks exactly as it does in a session.  Tokens per target step then measure
the acceptance of real text:

* :func:`simulate` runs the speculator over token ids with no model at all (the forward passes are
  counted, not made): the figure for a tokenizer and a drafter alone;
* ``qvq bench --spec-replay FILE`` runs the same replay through a real model (``ReplayTarget``): the
  forward passes are made and timed, so the figure comes with the time it takes on this machine.

Replay files: a ``.json`` with ``{"source": ..., "replies": [{"name", "question", "reply"}, ...]}``
(the fixture's format), or any other file read as one reply of plain UTF-8 text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvq_local.errors import InputError
from qvq_local.speculate.engine import SpecStats, Speculator
from qvq_local.speculate.ngram import NgramDrafter
from qvq_local.speculate.policy import DEFAULT_K, FixedPlan

#: QVQ-72B-Preview's seven published replies (their source is in the file), shipped with the package: the
#: default replay of ``qvq bench --speculation``
PUBLISHED_REPLIES = Path(__file__).with_name("replies") / "qvq72b_preview_blog.json"


@dataclass(frozen=True)
class Reply:
    name: str
    question: str
    text: str


def read_replies(path: str | Path) -> tuple[list[Reply], str]:
    """The replies in a replay file and where they come from (``source``, or the file name).

    A file that cannot be read, is empty, or is a JSON file without a ``replies`` list of texts raises
    a one-line ``InputError`` naming it.
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("replay file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the replay file: {exc}", path=path) from None
    if path.suffix.lower() != ".json":
        if not raw.strip():
            raise InputError("the replay file is empty", path=path)
        return [Reply(path.stem, "", raw)], path.name
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"not valid JSON: {exc}", path=path) from None
    items = data.get("replies") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise InputError('expected {"replies": [{"name", "question", "reply"}, ...]}', path=path)
    replies = []
    for i, item in enumerate(items):
        text = item.get("reply") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"reply {i + 1} has no text", path=path)
        replies.append(
            Reply(str(item.get("name") or f"reply {i + 1}"), str(item.get("question") or ""), text)
        )
    return replies, str(data.get("source") or path.name)


class ReplayTarget:
    """A :class:`~qvq_local.speculate.engine.Target` whose "sample" is the next token of a reply.

    ``inner``: a real session's target, whose forward passes and rollbacks are made (and timed by the
    speculator); None counts them without a model.
    """

    def __init__(self, tokens: list[int], inner: Any = None):
        self.tokens = list(tokens)
        self.at = 0
        self.inner = inner

    def forward(self, tokens: list[int], *, all_rows: bool) -> list[Any]:
        if self.inner is not None:
            return self.inner.forward(tokens, all_rows=all_rows)
        return [None] * (len(tokens) if all_rows else 1)

    def rollback(self, n: int) -> None:
        if self.inner is not None:
            self.inner.rollback(n)

    def sample(self, row: Any, mask: Any) -> int:
        tok = self.tokens[self.at]
        self.at += 1
        return tok


def replay(spec: Speculator, n: int) -> SpecStats:
    """Emit ``n`` tokens through ``spec`` (whose target is a :class:`ReplayTarget`)."""
    for _ in range(n):
        spec.advance(spec.sample(None))
    return spec.stats


def simulate(
    prompt_ids: list[int], reply_ids: list[int], k: int = DEFAULT_K, drafter: Any = None
) -> SpecStats:
    """The speculator's figures for ``reply_ids`` written after ``prompt_ids``, with ``k`` guesses per
    forward pass (n-gram lookup unless ``drafter`` is given); no model runs."""
    spec = Speculator(ReplayTarget(reply_ids), drafter or NgramDrafter(), FixedPlan(k), room=lambda: 1 << 30)
    spec.start(None, list(prompt_ids))
    return replay(spec, len(reply_ids))


__all__ = ["PUBLISHED_REPLIES", "Reply", "ReplayTarget", "read_replies", "replay", "simulate"]
