"""Events that flow from the reasoning controller to renderers and API callers.

Mechanism (backends) produces tokens; policy (``reasoning.py``) turns them into these events;
presentation (``render.py``) only draws them.  Keep this module free of heavy imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

StopReason = Literal["answer", "budget", "loop", "max_tokens", "interrupted", "cut"]
Phase = Literal["thought", "answer"]


@dataclass
class ImageInfo:
    """One image as it reached the model."""

    path: str
    original_size: tuple[int, int]  # (width, height) as loaded, after EXIF rotation
    size: tuple[int, int]  # (width, height) after bounding the pixel count
    tokens: int = 0  # image tokens the model sees (after spatial merge); 0 when unknown


@dataclass
class ClipInfo:
    """A clip as it reached the model: where it came from, what was sampled, what it cost."""

    path: str
    duration_s: float  # the clip's length
    timestamps: list[float]  # seconds of each sampled frame, from the clip's first frame
    source_size: tuple[int, int]  # (width, height), upright
    frame_size: tuple[int, int]  # (width, height) the frames were sized to
    tokens: int  # tokens the clip takes in the prompt
    mode: Literal["video", "frames"] = "video"  # native video input, or one image per frame
    decode_s: float = 0.0  # opening, seeking, decoding and sizing the frames
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return len(self.timestamps)


@dataclass
class Timings:
    """Seconds and rates of one question.  Rates are tokens per second; 0.0 when not measured."""

    load_s: float = 0.0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0  # prompt + image tokens into the KV cache, image encoding included
    prefill_tok_s: float = 0.0
    first_token_s: float = 0.0  # from the start of prefill to the first generated token
    decode_s: float = 0.0
    decode_tok_s: float = 0.0
    forced_step_s: float = 0.0  # feeding the forced transition text (0 when nothing was forced)
    total_s: float = 0.0


@dataclass
class Started:
    """Emitted once, after prefill, before the first generated token."""

    model: str
    backend: str
    quantization: str
    images: list[ImageInfo]
    prompt_tokens: int
    think_budget: int | None
    answer_budget: int | None
    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    #: how the images were bounded, for headers: the detail level and its token budget, and where it
    #: comes from ("detail high (<= 1,280 image tokens; default: CUDA GPU encodes the images)")
    detail: str = ""
    clip: ClipInfo | None = None
    kind: Literal["started"] = "started"


@dataclass
class TextDelta:
    """A piece of generated text, already split into thought or answer."""

    phase: Phase
    text: str
    tokens: int  # tokens this delta accounts for (may be 0 for text held back by the splitter)
    kind: Literal["delta"] = "delta"


@dataclass
class Forced:
    """The controller fed text the model did not write (budget exhausted or loop cut)."""

    reason: Literal["budget", "loop"]
    text: str
    at_token: int  # thought tokens generated when forcing happened
    seconds: float = 0.0  # time spent feeding the forced text
    kind: Literal["forced"] = "forced"


@dataclass
class Result:
    """The outcome of one question."""

    thought: str
    answer: str
    boxed: str | None
    stop_reason: StopReason
    thought_tokens: int
    answer_tokens: int
    prompt_tokens: int
    forced: list[Forced] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    backend: str = ""
    quantization: str = ""
    images: list[ImageInfo] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # --samples N (N > 1): every chain's own Result, and the vote (qvq_local.chains.vote) that picked the
    # chain whose thought/answer/boxed this Result carries.  Empty/None for one chain.
    chains: list[Result] = field(default_factory=list)
    vote: dict | None = None
    clip: ClipInfo | None = None  # the question's clip (qvq_local.video), if it had one

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.chains:  # one chain: the same dict as before --samples existed
            data.pop("chains")
            data.pop("vote")
        if self.clip is None:  # no clip: the same dict as before clips existed
            data.pop("clip")
        return data


@dataclass
class Finished:
    result: Result
    kind: Literal["finished"] = "finished"


@dataclass
class Speculating:
    """Speculative decoding's running figures while a question decodes (``--speculate``), from the API now
    and then and once before ``Finished``; renderers show them, nothing depends on them.

    ``mode``: what was asked (``ngram``, ``draft``, ``auto``); ``on``: whether guesses are being checked
    now (``auto`` turns it off where it does not pay); ``steps``: target forward passes that
    ``tokens`` generated tokens took; ``accepted`` of ``drafted`` guesses were right.
    """

    mode: str
    on: bool
    tokens: int
    steps: int
    accepted: int = 0
    drafted: int = 0
    kind: Literal["speculating"] = "speculating"

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


@dataclass
class ChainEvent:
    """With ``--samples N``: an event of chain ``chain`` (0-based): its TextDelta, Forced or Finished.

    The stream of N chains is ``Started``, then ``ChainEvent``s of all chains interleaved, then one
    ``Finished`` whose Result carries every chain and the vote.
    """

    chain: int
    event: TextDelta | Forced | Finished
    kind: Literal["chain"] = "chain"


Event = Started | TextDelta | Forced | Finished | ChainEvent | Speculating
