"""The Session protocol: the only thing the reasoning controller knows about a backend.

A backend is mechanism only.  It turns a prompt with images into a KV cache (``prefill``), makes one
token at a time (``step``) and appends text the controller forces (``feed``) without touching the images
again.  It never decides when thinking ends; ``qvq_local.reasoning`` does.

Lifecycle::

    loaded = spec.open_model(resolved_model, options)              # LoadedModel, heavy, once (registry)
    session = loaded.new_session(sampling)                         # cheap, one per question
    stats = session.prefill(prompt)                                # images encoded here, once
    while ...:
        tok = session.step()                                       # Token(id, text, is_eos)
    session.feed("\\n\\nTime is up.\\n\\n**Final Answer**\\n")       # forced text, KV cache kept
    session.close()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: How a sampling value is reported when none was sent and the server applied its own (a remote backend).
SERVER_DEFAULT = "server default"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings.  ``None`` means "take the model's generation_config value"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def resolved(self, defaults: dict, fallback: dict) -> SamplingParams:
        """Fill unset fields from a generation_config-like dict, then from ``fallback`` (the model family's
        published values, ``Family.sampling``)."""
        last = {**fallback, "seed": 0}
        out = {}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name, last[name])
            out[name] = value
        return SamplingParams(**out)


@dataclass(frozen=True)
class ChatTurn:
    """One question (after any earlier turns) as a chat request, for a backend with the registry's ``chat_messages`` capability: a
    server that applies its own chat template and may keep the thinking budget itself."""

    question: str
    system: str | None = None  # None: no system message
    think_budget: int | None = None
    #: the most tokens the controller will let this question generate (thought cap, forced text margin and
    #: answer budget), sent as ``max_tokens`` so the server never runs on past it; None when nothing known
    #: bounds it (no budget, no ``max_tokens`` and no context the server states): then nothing is sent
    max_new_tokens: int | None = None
    #: the answer budget, for a server that keeps it (``loaded.answer_budget_on_server``)
    answer_budget: int | None = None
    #: the server template's thinking switch (``enable_thinking``; None: the server's default)
    think: bool | None = None
    #: the turns before the question (:class:`qvq_local.conversation.Turn`), user turns with their images
    #: (PIL, bounded) and assistant turns as their answers
    history: tuple = ()


@dataclass
class Prompt:
    """A single-turn prompt, already rendered from the model's chat template.

    ``text`` holds the whole templated prompt, ending with the assistant turn's opening
    (``<|im_start|>assistant\\n``).  Each image appears in ``text`` as the model's own vision block
    (for Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``), once per entry in ``images``, in
    order.  Backends rewrite that block into whatever their library wants (mlx-vlm expands the pad;
    llama.cpp's mtmd wants its media marker).  ``chat``: the same question untemplated, filled for the
    backends that read it (the registry's ``chat_messages`` capability), None for the others.  ``clip``:
    a sampled clip (``qvq_local.video.Clip``) for a backend with the ``video_input`` capability, the text
    then holding the family's video block once (and ``images`` empty).
    """

    text: str
    images: list  # list[PIL.Image.Image], RGB, already bounded by qvq_local.images
    image_paths: list[str] = field(default_factory=list)
    chat: ChatTurn | None = None
    clip: Any = None  # qvq_local.video.Clip
    #: text written before each image (a clip's frames: their times), for backends that build their own
    #: messages from ``chat`` (the templated ``text`` already holds it); empty: none
    image_labels: list[str] = field(default_factory=list)


@dataclass
class PrefillStats:
    prompt_tokens: int  # tokens in the KV cache after prefill, image tokens included
    image_tokens: int  # of which image tokens (all images)
    image_encode_s: float  # seconds spent in the vision encoder (0.0 when not separable)
    prefill_s: float  # seconds for the whole prefill, image encoding included
    image_tokens_per_image: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Token:
    """One generated token.

    ``text`` is the new, complete text this token adds: a multi-byte character split across tokens
    comes out whole with the token that completes it (earlier tokens carry ``""``).
    """

    id: int
    text: str
    is_eos: bool = False


@dataclass(frozen=True, eq=False)
class TokenMask:
    """Token ids that ``Session.step(banned=...)`` must not sample (the policy layer decides which).

    ``ids``: a sorted int32 numpy array.  A backend derives its own form (a logit-bias sampler, an
    additive logits vector) once per mask object and reuses it, so pass the same object every step.
    ``label`` says what is masked, for settings and logs.
    """

    ids: object  # numpy.ndarray[int32], sorted, unique
    label: str = ""

    def __len__(self) -> int:
        return len(self.ids)


@runtime_checkable
class Session(Protocol):
    """One question's worth of state: the KV cache and the sampler."""

    backend: str  # the registry name of its backend
    n_ctx: int  # the context size in tokens (positions) this session can hold
    n_past: int  # KV-cache entries used so far (what n_ctx limits; M-RoPE positions may run behind it)
    images_encoded: int  # how many times an image went through the vision encoder (tests assert on it)

    def prefill(self, prompt: Prompt) -> PrefillStats:
        """Fill the KV cache.  A backend with the registry's ``prefix_state`` capability also takes
        ``keep_prefix=True`` (then ``session.prefix_state``) and ``prefix=state`` (:class:`PrefixState`);
        a state it refuses raises ``InputError`` and leaves the session as it was."""
        ...

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample and decode one token; ids in ``banned`` are never sampled (None or empty: no mask)."""
        ...

    def feed(self, text: str) -> int:
        """Append ``text`` (tokenised, no special-token parsing) to the context; return its token count."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model in memory, ready to open sessions.  What else one offers is its backend's registry
    capabilities (``tokenize`` for ``tokenizer``, ``token_pieces`` for ``vocabulary``, ``new_session(...,
    n_seq=)`` for ``chains``, ``prefix_identity`` for ``prefix_state``, ``budget_on_server`` for
    ``server_budget``): code asks the registry, never the object, whether it has them."""

    backend: str
    name: str
    quantization: str
    chat_template: str | None  # the model's own Jinja chat template
    generation_config: dict  # temperature/top_p/top_k/repetition_penalty as the model ships them
    context_length: int  # the model's trained context length
    image_token_estimate: callable  # (width, height) -> image tokens after merge, for context sizing

    def new_session(self, sampling: SamplingParams, *, n_ctx: int | None = None) -> Session: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class PrefixState:
    """The KV state of a prompt's prefix: everything up to and including its last image block.

    Made by ``session.prefill(prompt, keep_prefix=True)`` (then ``session.prefix_state``) and given back
    with ``new_session.prefill(prompt, prefix=state)``, which restores it instead of encoding the images
    and decodes only the rest of the prompt.  Only backends with the registry's ``prefix_state``
    capability take these.  ``qvq_local.prefix_cache`` decides when to reuse one and stores them.

    ``ids``: the prefix's token ids as the backend tokenised them (image tokens included, where the
    backend knows them): a restore checks them against the new prompt's.  ``tensors``: numpy arrays
    (the backend's own layout); ``meta``: small JSON-able values the backend needs back.
    """

    backend: str
    n_cells: int  # KV cells the prefix fills
    n_pos: int  # positions it advances (M-RoPE: fewer than cells after an image)
    ids: list[int]
    tensors: dict  # name -> numpy.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(sum(int(a.nbytes) for a in self.tensors.values())) + 4 * len(self.ids)
