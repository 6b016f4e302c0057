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
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from qvq_local.backends.base import SamplingParams
from qvq_local.budgets import DEFAULT_ANSWER_BUDGET
from qvq_local.errors import InputError
from qvq_local.video import VideoOptions

#: A clip's sampling options, given flat (``fps=1``) and kept as one :class:`~qvq_local.video.VideoOptions`.
VIDEO_OPTIONS = ("fps", "max_frames", "video_tokens")

#: The largest top-k (llama.cpp takes a 32-bit int) and seed (llama.cpp's sampler seeds are 32-bit).
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**32 - 1

#: How ``qvq ask`` spells each checked option in its messages.
CLI_LABELS: Mapping[str, str | None] = MappingProxyType(
    {
        "think_budget": "--think-budget",
        "answer_budget": "--answer-budget",
        "max_pixels": "--max-pixels",
        "detail": "--detail",
        "temperature": "--temperature",
        "top_p": "--top-p",
        "top_k": "--top-k",
        "repetition_penalty": "--repetition-penalty",
        "lang_lock": "--lang-lock",
        "max_tokens": "--max-tokens",
        "samples": "--samples",
        "seed": "--seed",
        "system": "--system",
        "think": "--think/--no-think",
        "speculate": "--speculate",
        "fps": "--fps",
        "max_frames": "--max-frames",
        "video_tokens": "--video-tokens",
    }
)
#: How the Python API spells them (``None``: the owning module's own wording, here the language lock's).
API_LABELS: Mapping[str, str | None] = MappingProxyType(
    {
        "think_budget": "the think budget",
        "answer_budget": "the answer budget",
        "max_pixels": "max_pixels",
        "detail": "detail",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "repetition_penalty": "repetition_penalty",
        "lang_lock": None,
        "max_tokens": "max_tokens",
        "samples": "samples",
        "seed": "seed",
        "system": "system",
        "forced_text": "forced_text",
        "think": "think",
        "speculate": "speculate",
    }
)


@dataclass(frozen=True)
class AskSettings:
    """Everything one question is asked with.  Construction checks and normalises every value.

    ``think_budget``: thought tokens before the answer is forced (None: up to what the context holds).
    ``answer_budget``: answer tokens (None: no limit of its own).  ``max_pixels``: the pixel bound per image
    (None: from ``detail``).  ``detail``: the image detail level, low | medium | high | max
    (:mod:`qvq_local.detail`; None or ``auto``: the loaded model's, else this machine's default); a
    ``max_pixels`` given wins over it.  ``sampling``: overrides of the model's
    generation_config (None fields: the model's own).  ``system``: replaces the family's system prompt (``""``:
    the template's own default).  ``loop_detection``: cut reasoning loops.  ``forced_text``: fed when
    thinking is cut (None: what suits the model and the question).  ``lang_lock``: auto | on | off
    (:mod:`qvq_local.lang`).  ``samples``: reasoning chains from one prefill, decoded in one batch, whose
    ``\\boxed{}`` answers vote (:mod:`qvq_local.chains`; 1: one chain, as always).  ``think``: switch the
    model's thinking on or off where its chat template has the switch (``enable_thinking``: Qwen3.5);
    None: the template's own default.  ``speculate``: off |
    ngram | draft | auto, speculative decoding in the backend session (:mod:`qvq_local.speculate`; the
    output is plain decoding's, only faster where it pays; ``draft`` needs a model loaded with a draft).
    """

    think_budget: int | None = None
    answer_budget: int | None = DEFAULT_ANSWER_BUDGET
    max_pixels: int | None = None
    detail: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    loop_detection: bool = True
    forced_text: str | None = None
    lang_lock: str = "auto"
    #: a cap on all generated tokens, thought and answer together (an OpenAI client's ``max_tokens``);
    #: thinking is cut early enough to leave the answer room under it.  None: no cap of its own.
    max_tokens: int | None = None
    samples: int = 1  # reasoning chains decoded together from one prefill; their boxed answers vote
    think: bool | None = None  # the template's thinking switch (enable_thinking); None: its default
    speculate: str = "off"  # off | ngram | draft | auto (qvq_local.speculate.config.MODES)
    #: how a clip is sampled (``fps``, ``max_frames``, ``video_tokens``, given flat: :data:`VIDEO_OPTIONS`)
    video: VideoOptions = field(default_factory=VideoOptions)
    labels: Mapping[str, str | None] = field(default_factory=lambda: API_LABELS, compare=False, repr=False)

    @classmethod
    def build(
        cls, options: Mapping[str, object], labels: Mapping[str, str | None] | None = None
    ) -> AskSettings:
        """The settings from options by the names ``Model.stream`` and ``qvq ask`` take: this type's fields,
        with the sampling ones (:data:`SAMPLING_OPTIONS`) given flat; a name not given keeps its default
        (``answer_budget=None`` is given: no answer budget of its own).  An unknown name is a ``TypeError`` naming it, as for any Python call."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"sampling", "labels", "video"}
        values: dict = {}
        sampling: dict = {}
        video: dict = {}
        for name, value in options.items():
            if name in SAMPLING_OPTIONS:
                sampling[name] = value
            elif name in VIDEO_OPTIONS:
                video[name] = value
            elif name in fields:
                values[name] = value
            else:
                raise TypeError(f"unexpected option {name!r} for a question (known: {', '.join(_names())})")
        return cls(
            **values,
            sampling=SamplingParams(**sampling),
            video=VideoOptions(**video),
            labels=labels or API_LABELS,
        )

    def __post_init__(self) -> None:
        from qvq_local import lang
        from qvq_local.detail import AUTO, check_level

        label = {**API_LABELS, **self.labels}.get
        self._set("lang_lock", lang.check_mode(self.lang_lock, label("lang_lock")))
        self._set("speculate", check_speculate(self.speculate, label("speculate")))
        if self.detail is not None:
            level = check_level(self.detail, label("detail"))
            self._set("detail", None if level == AUTO else level)
        for name in ("think_budget", "answer_budget", "max_pixels", "max_tokens"):
            value = _whole(getattr(self, name), label(name))
            if value is not None and value <= 0:
                raise InputError(f"{label(name)} must be above 0, got {value}")
            self._set(name, value)
        for name in ("system", "forced_text"):
            check_text(getattr(self, name), label(name))
        if self.think is not None and not isinstance(self.think, bool):
            raise InputError(f"{label('think')} must be true or false, got {self.think!r}")
        self.video.check()
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or not 1 <= self.samples <= 64:
            raise InputError(f"{label('samples')} must be a whole number from 1 to 64, got {self.samples!r}")
        s = self.sampling
        temperature = _finite(s.temperature, label("temperature"))
        top_p = _finite(s.top_p, label("top_p"))
        top_k = _whole(s.top_k, label("top_k"))
        penalty = _finite(s.repetition_penalty, label("repetition_penalty"))
        seed = _whole(s.seed, label("seed"))
        if temperature is not None and temperature < 0:
            raise InputError(f"{label('temperature')} must be 0 or more, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InputError(f"{label('top_p')} must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise InputError(f"{label('top_k')} must be 0 or more, got {top_k}")
        if top_k is not None and top_k > MAX_TOP_K:
            raise InputError(f"{label('top_k')} must be at most {MAX_TOP_K}, got {top_k}")
        if penalty is not None and penalty <= 0:
            raise InputError(f"{label('repetition_penalty')} must be above 0, got {penalty}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InputError(f"{label('seed')} must be a whole number from 0 to {MAX_SEED}, got {seed}")
        checked = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty, seed=seed
        )
        if checked != s:
            self._set("sampling", checked)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising inside the frozen constructor


def check_speculate(value: object, label: str | None) -> str:
    """``off``, ``ngram``, ``draft`` or ``auto`` (:data:`qvq_local.speculate.config.MODES`)."""
    from qvq_local.speculate.config import check_mode

    return check_mode(value, label or "speculate")


def check_text(value: str | None, label: str | None) -> None:
    """The rule for every text a question carries (the question, the system prompt, the forced text; the
    server applies it to its whole body): a lone UTF-16 surrogate is not text, and is refused by name
    rather than replaced, so nothing reaches the model that the user did not write."""
    from qvq_local.strict_json import lone_surrogate

    point = lone_surrogate(value) if isinstance(value, str) else None
    if point is not None:
        raise InputError(
            f"{label} holds a lone UTF-16 surrogate ({point}), which is not text (bytes that are not UTF-8?)"
        )


def _finite(value: object, label: str | None) -> float | None:
    """A real number that is finite (NaN passes every range comparison, infinity every lower bound)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        raise InputError(f"{label} must be a finite number, got {value}") from None
    if not math.isfinite(number):
        raise InputError(f"{label} must be a finite number, got {value}")
    return number if isinstance(value, float) else value


def _whole(value: object, label: str | None) -> int | None:
    """A whole number: an int, or a float with no fraction (``1e3`` from a JSON or Python caller)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InputError(f"{label} must be a whole number, got {value}")
        return int(value)
    return value


#: The sampling options, given flat to :meth:`AskSettings.build` (``temperature=0.7``), kept in ``sampling``.
SAMPLING_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _names() -> list[str]:
    own = [f.name for f in dataclasses.fields(AskSettings) if f.name not in ("sampling", "labels", "video")]
    return [*own, *SAMPLING_OPTIONS, *VIDEO_OPTIONS]


__all__ = ["API_LABELS", "CLI_LABELS", "SAMPLING_OPTIONS", "AskSettings", "check_text"]
