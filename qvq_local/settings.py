"""The options of one question, as one typed object built once and checked once.

``qvq ask`` builds it in :mod:`qvq_local.ask_cmd` from its options (after ``qvq config`` filled what the
user left out); the API builds it in :meth:`qvq_local.model.Model.stream` from its keyword arguments; both
with :meth:`AskSettings.build`, which takes the options by the names both callers use.  Either way the
object is checked in its constructor and then passed down whole: the image loader reads ``max_pixels``,
the prompt reads ``system``, the backend session reads ``sampling`` and the reasoning controller the
budgets, the loop stop, the forced text and the language lock.  How the model is loaded (the backend and
its options) is not a question's setting: see :func:`qvq_local.api.load`.

The rules are the same for both callers; only the names in the messages differ, so each error names what
the caller typed: ``--think-budget must be above 0, got 0`` on the command line, ``the think budget must be
above 0, got 0`` from Python.  ``labels`` carries those names (see :data:`CLI_LABELS`, :data:`API_LABELS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from qvq_local.backends.base import SamplingParams
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET
from qvq_local.errors import InputError

#: How ``qvq ask`` spells each checked option in its messages.
CLI_LABELS: Mapping[str, str | None] = MappingProxyType(
    {
        "think_budget": "--think-budget",
        "answer_budget": "--answer-budget",
        "max_pixels": "--max-pixels",
        "temperature": "--temperature",
        "top_p": "--top-p",
        "top_k": "--top-k",
        "repetition_penalty": "--repetition-penalty",
        "lang_lock": "--lang-lock",
        "max_tokens": "--max-tokens",
        "samples": "--samples",
    }
)
#: How the Python API spells them (``None``: the owning module's own wording, here the language lock's).
API_LABELS: Mapping[str, str | None] = MappingProxyType(
    {
        "think_budget": "the think budget",
        "answer_budget": "the answer budget",
        "max_pixels": "max_pixels",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "repetition_penalty": "repetition_penalty",
        "lang_lock": None,
        "max_tokens": "max_tokens",
        "samples": "samples",
    }
)


@dataclass(frozen=True)
class AskSettings:
    """Everything one question is asked with.  Construction checks and normalises every value.

    ``think_budget``: thought tokens before the answer is forced (None: up to what the context holds).
    ``answer_budget``: answer tokens (None: no limit of its own).  ``max_pixels``: the pixel bound per image
    (None: the loaded model's, else the family's default).  ``sampling``: overrides of the model's
    generation_config (None fields: the model's own).  ``system``: replaces the family's system prompt (``""``:
    the template's own default).  ``loop_detection``: cut reasoning loops.  ``forced_text``: fed when
    thinking is cut (None: what suits the model and the question).  ``lang_lock``: auto | on | off
    (:mod:`qvq_local.lang`).  ``samples``: reasoning chains from one prefill, decoded in one batch, whose
    ``\\boxed{}`` answers vote (:mod:`qvq_local.chains`; 1: one chain, as always).
    """

    think_budget: int | None = None
    answer_budget: int | None = DEFAULT_ANSWER_BUDGET
    max_pixels: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    loop_detection: bool = True
    forced_text: str | None = None
    lang_lock: str = "auto"
    #: a cap on all generated tokens, thought and answer together (an OpenAI client's ``max_tokens``);
    #: thinking is cut early enough to leave the answer room under it.  None: no cap of its own.
    max_tokens: int | None = None
    samples: int = 1  # reasoning chains decoded together from one prefill; their boxed answers vote
    labels: Mapping[str, str | None] = field(default_factory=lambda: API_LABELS, compare=False, repr=False)

    @classmethod
    def build(
        cls, options: Mapping[str, object], labels: Mapping[str, str | None] | None = None
    ) -> AskSettings:
        """The settings from options by the names ``Model.stream`` and ``qvq ask`` take: this type's fields,
        with the sampling ones (:data:`SAMPLING_OPTIONS`) given flat; a name not given keeps its default
        (``answer_budget=None`` is given: no answer budget of its own).  An unknown name is a ``TypeError`` naming it, as for any Python call."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"sampling", "labels"}
        values: dict = {}
        sampling: dict = {}
        for name, value in options.items():
            if name in SAMPLING_OPTIONS:
                sampling[name] = value
            elif name in fields:
                values[name] = value
            else:
                raise TypeError(f"unexpected option {name!r} for a question (known: {', '.join(_names())})")
        return cls(**values, sampling=SamplingParams(**sampling), labels=labels or API_LABELS)

    def __post_init__(self) -> None:
        from qvq_local import lang

        label = {**API_LABELS, **self.labels}.get
        self._set("lang_lock", lang.check_mode(self.lang_lock, label("lang_lock")))
        for name in ("think_budget", "answer_budget", "max_pixels", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{label(name)} must be above 0, got {value}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or not 1 <= self.samples <= 64:
            raise InputError(f"{label('samples')} must be a whole number from 1 to 64, got {self.samples!r}")
        s = self.sampling
        if s.temperature is not None and s.temperature < 0:
            raise InputError(f"{label('temperature')} must be 0 or more, got {s.temperature}")
        if s.top_p is not None and not 0 < s.top_p <= 1:
            raise InputError(f"{label('top_p')} must be in (0, 1], got {s.top_p}")
        if s.top_k is not None and s.top_k < 0:
            raise InputError(f"{label('top_k')} must be 0 or more, got {s.top_k}")
        if s.repetition_penalty is not None and s.repetition_penalty <= 0:
            raise InputError(f"{label('repetition_penalty')} must be above 0, got {s.repetition_penalty}")

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising inside the frozen constructor


#: The sampling options, given flat to :meth:`AskSettings.build` (``temperature=0.7``), kept in ``sampling``.
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _names() -> list[str]:
    own = [f.name for f in dataclasses.fields(AskSettings) if f.name not in ("sampling", "labels")]
    return [*own, *SAMPLING_OPTIONS]


__all__ = ["API_LABELS", "CLI_LABELS", "SAMPLING_OPTIONS", "AskSettings"]
