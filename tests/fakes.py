"""A scripted fake Session: makes the reasoning controller (and the API on top) testable without a model.

``ScriptedSession`` plays back token texts from a script.  After a ``feed()`` (the controller forcing an
answer) it switches to the ``answer`` script when one is given.  It records everything a test may want
to assert on: prefill calls, images encoded, fed texts, steps taken, and the full transcript the "model"
has in its context.  Token counting uses a simple deterministic tokenizer (:func:`chop`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from qvq_local.backends import registry
from qvq_local.backends.base import PrefillStats, Prompt, Token

#: The registry entry of the test fakes' "backend": what a fake loaded model declares it can do (counting
#: a prompt's tokens with ``tokenize``).  Not registered: ``qvq_local.model.Model`` takes the spec itself.
FAKE_BACKEND = registry.BackendSpec(name="fake", module="fakes", capabilities=frozenset({registry.TOKENIZER}))
#: The same, for a fake that also lists its vocabulary (``token_pieces``: the language lock).
FAKE_BACKEND_WITH_VOCABULARY = registry.BackendSpec(
    name="fake", module="fakes", capabilities=frozenset({registry.TOKENIZER, registry.VOCABULARY})
)

_TOKEN_RE = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def chop(text: str) -> list[str]:
    """Split ``text`` into token-like pieces (runs of whitespace, words, single symbols); joins back exactly."""
    return _TOKEN_RE.findall(text)


def _as_tokens(script: str | Iterable[str] | None) -> Iterator[str]:
    if script is None:
        return iter(())
    if isinstance(script, str):
        return iter(chop(script))
    return iter(script)


class ScriptedSession:
    """Plays back ``thought`` (a string, chopped into tokens, or any iterable of token texts, even an
    endless one), then EOS.  After the first ``feed()``, plays ``answer`` instead (when given), then EOS.

    ``eos``: end each script with an EOS token (False: an exhausted script keeps producing ``filler``).
    ``interrupt_at``: raise KeyboardInterrupt on that step (1-based), as Ctrl-C would inside a backend.
    """

    backend = "fake"

    def __init__(
        self,
        thought: str | Iterable[str],
        answer: str | Iterable[str] | None = None,
        *,
        n_ctx: int = 100_000,
        prompt_tokens: int = 10,
        eos: bool = True,
        filler: str = " more",
        interrupt_at: int | None = None,
    ):
        self._script = _as_tokens(thought)
        self._answer = answer
        self.n_ctx = n_ctx
        self.n_past = prompt_tokens  # as if already prefilled
        self.eos = eos
        self.filler = filler
        self.interrupt_at = interrupt_at
        self.images_encoded = 0
        self.prefill_calls: list[Prompt] = []
        self.fed: list[str] = []
        self.steps = 0
        self.generated: list[str] = []  # texts of the tokens produced (EOS excluded)
        self.transcript = ""  # everything after the prompt: generated and fed text, in order
        self.closed = False
        self.banned: list = []  # the ``banned`` mask passed to each step (None when none)

    # -- Session protocol
    def prefill(self, prompt: Prompt) -> PrefillStats:
        self.prefill_calls.append(prompt)
        self.images_encoded += len(prompt.images)
        n = len(chop(prompt.text)) + 16 * len(prompt.images)
        self.n_past = n
        return PrefillStats(
            prompt_tokens=n,
            image_tokens=16 * len(prompt.images),
            image_encode_s=0.0,
            prefill_s=0.0,
            image_tokens_per_image=[16] * len(prompt.images),
        )

    def step(self, banned=None) -> Token:
        self.steps += 1
        self.banned.append(banned)
        if self.interrupt_at is not None and self.steps == self.interrupt_at:
            raise KeyboardInterrupt
        if self.n_past >= self.n_ctx:
            raise RuntimeError("fake session: context overflow (the controller should have stopped)")
        self.n_past += 1
        try:
            text = next(self._script)
        except StopIteration:
            if self.eos:
                return Token(id=2, text="", is_eos=True)
            text = self.filler
        self.generated.append(text)
        self.transcript += text
        return Token(id=1000 + len(text), text=text, is_eos=False)

    def feed(self, text: str) -> int:
        n = self.count_tokens(text)
        if self.n_past + n > self.n_ctx:
            raise RuntimeError("fake session: feed overflows the context")
        self.fed.append(text)
        self.transcript += text
        self.n_past += n
        if self._answer is not None and len(self.fed) == 1:
            self._script = _as_tokens(self._answer)
        return n

    def count_tokens(self, text: str) -> int:
        return len(chop(text))

    def close(self) -> None:
        self.closed = True
