"""The token budgets of one question and the context they need: the defaults and the sizing rule.

A question's context holds the prompt (its text and image tokens), the thought (its budget; without one,
up to :data:`DEFAULT_MAX_THOUGHT` or what the context holds), the forced text and the grace window before
it (:data:`FORCE_MARGIN`), and the answer (its budget, :data:`DEFAULT_ANSWER_BUDGET` unless the caller sets
one).  The API sizes each question's context with :func:`size_context` and refuses, before any decoding,
budgets that cannot fit; ``qvq doctor`` and ``qvq models --available`` plan for the context a question
with the defaults opens (:func:`qvq_local.fit.default_context`).

Here, on the lowest floor, so that the fit rules (below the API) follow the same numbers as the API.
"""

from __future__ import annotations

from collections.abc import Mapping

from qvq_local.errors import ContextOverflow

#: Answer tokens allowed after thinking ends, when the caller sets none.
DEFAULT_ANSWER_BUDGET = 1024
#: Thought tokens allowed when no thinking budget is set: QVQ's published max_new_tokens.
DEFAULT_MAX_THOUGHT = 8192
#: Room kept for the forced transition text and the grace window before it.
FORCE_MARGIN = 96
#: The context assumed for a model that does not say how long its trained context is.
UNKNOWN_CONTEXT_LENGTH = 32768


#: How the hint spells the options by default: the command line's flags
_FLAGS = {
    "think_budget": "--think-budget",
    "answer_budget": "--answer-budget",
    "detail": "--detail",
    "max_pixels": "--max-pixels",
}


def size_context(
    context_length: int | None,
    text_tokens: int,
    image_tokens: int,
    *,
    think_budget: int | None,
    answer_budget: int | None,
    max_pixels: int | None = None,
    labels: Mapping[str, str | None] | None = None,
) -> tuple[int, int]:
    """``(n_ctx, thought cap)`` for one question on a model trained for ``context_length`` tokens (0:
    unknown, :data:`UNKNOWN_CONTEXT_LENGTH` assumed; None: a remote server that states no context, where
    nothing is refused here and the server's own limit applies); ContextOverflow, whose hint names the
    budgets, ``--detail`` and ``--max-pixels`` (``max_pixels``: the bound in use, for the hint), when the
    prompt and the budgets cannot fit.  ``labels``: how the caller spells ``think_budget``,
    ``answer_budget``, ``detail`` and ``max_pixels`` in the hint (the command line's flags by default; the
    API's names, a request's fields for ``qvq serve``)."""
    name = {**_FLAGS, **{k: v for k, v in (labels or {}).items() if v}}
    answer = answer_budget or DEFAULT_ANSWER_BUDGET
    fixed = text_tokens + image_tokens + FORCE_MARGIN + answer
    if context_length is None:
        thought_cap = DEFAULT_MAX_THOUGHT if think_budget is None else think_budget
        return fixed + thought_cap, thought_cap
    limit = context_length or UNKNOWN_CONTEXT_LENGTH
    pixels_hint = (
        f"lower {name['detail']} or {name['max_pixels']}"
        + (f" (now {max_pixels} pixels)" if max_pixels else "")
        + " to shrink the image tokens"
    )
    if think_budget is None:
        room = limit - fixed
        if room < 16:
            raise ContextOverflow(
                f"the prompt needs {text_tokens} text + {image_tokens} image tokens and the answer "
                f"budget {answer}, but the model's context holds {limit} tokens",
                hint=f"{pixels_hint}, or lower {name['answer_budget']}",
            )
        thought_cap = min(DEFAULT_MAX_THOUGHT, room)
    else:
        thought_cap = think_budget
        if fixed + think_budget > limit:
            raise ContextOverflow(
                f"{text_tokens} prompt + {image_tokens} image tokens + think budget {think_budget} + "
                f"answer budget {answer} need {fixed + think_budget} tokens, but the model's context "
                f"holds {limit}",
                hint=f"{pixels_hint}, or lower {name['think_budget']} or {name['answer_budget']}",
            )
    return min(limit, fixed + thought_cap), thought_cap


__all__ = ["DEFAULT_ANSWER_BUDGET", "DEFAULT_MAX_THOUGHT", "FORCE_MARGIN", "size_context"]
