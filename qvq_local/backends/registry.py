"""The backends qvq-local can run a model on: one entry each, read by every place that names a backend.

Why one table: the names a user may type (``--backend``, ``qvq config set backend``, ``QVQ_BACKEND``,
``qvq bench``), the model formats each backend loads, the ``pip install`` line shown when it is missing,
what it can do, the options it is loaded with and the module that runs it were once written in eight
modules, and the copies disagreed.  Each backend is now one :class:`BackendSpec`, registered with
:func:`register`: the built-in ones below, and a plugin's the same way (:mod:`qvq_local.plugins`: the
modules named in ``QVQ_PLUGINS`` and the ``qvq_local.plugins`` entry points, run when this module is
first imported).  Nothing else in the package names a backend to decide what to do with it: it asks the
spec whether the backend has a capability, or calls one of its hooks.

This module is data and imports nothing heavy (``qvq --help`` reads it for its help text).  A backend's
module is named by its dotted path and imported (``importlib``) only when a model is loaded
(:meth:`BackendSpec.open_model`) or one of its hooks is asked for (:meth:`BackendSpec.hook`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qvq_local.backends.options import LoadOptions, OpenAIOptions
from qvq_local.errors import InputError

# ---------------------------------------------------------------- capabilities
# What a backend can do, as the rest of the code asks it (``spec.has(...)``), and what each one promises.

#: keeps the KV cache in this process (prefill once, feed forced text into the same cache)
LOCAL_KV_CACHE = "local_kv_cache"
#: encodes images itself (vision tower in process)
IMAGE_ENCODING = "image_encoding"
#: talks to a server instead of loading weights here: ``open_model`` gets the model's name there (or None),
#: ``auto`` never picks it, and the places that measure this machine (bench, self-test) leave it out.  Its
#: loaded model's ``context_length`` is what the server states (0: none); its sessions' ``sampling`` holds
#: what they send (a field None is not sent: the server's default), ``request_report()`` how the question
#: was put (a dict for ``settings["remote"]``) and ``token_counts(thought, answer)`` the counts to report
#: (the server's usage where it sent one; ``.how`` says which)
REMOTE = "remote"
#: ``session.prefill(prompt, keep_prefix=True)`` then ``session.prefix_state``, and
#: ``session.prefill(prompt, prefix=state)``: the image prefix's KV state is exported and restored
#: (qvq_local.prefix_cache); ``loaded.prefix_identity()`` -> ``{"files": [...], ...}``: the model files
#: besides its main path and the facts of how its KV cache is computed, which a saved state must match
PREFIX_STATE = "prefix_state"
#: with ``prefix_state``: ``session.prefill(prompt, prefix=state, keep_prefix=True)`` also takes a state
#: that ends at an earlier image of the prompt (an earlier turn of a conversation): it is restored, only the
#: later images are encoded, and ``session.prefix_state`` is then the state at the prompt's last image
PARTIAL_PREFIX = "partial_prefix"
#: ``loaded.new_session(sampling, n_ctx=, n_seq=N)`` then ``session.fork(N)``: N reasoning chains from one
#: prefill, decoded in one batch (``--samples``)
CHAINS = "chains"
#: the prefix state and the chains above hold a recurrent (linear-attention) layer's state too, for a
#: model whose family has one (``Family.recurrent_state``: Qwen3.5's Gated DeltaNet layers): a state that
#: cannot be cut back to a shorter prefix is snapshotted with the prefix and copied per chain.  Without it
#: such a model runs without prefix reuse and with one chain (said in one line)
RECURRENT_STATE = "recurrent_state"
#: ``loaded.tokenize(text, special=True)``: the token ids of a templated prompt before a session opens
#: (the context is sized from it; without it, from the text's byte count, an upper bound)
TOKENIZER = "tokenizer"
#: ``loaded.token_pieces()``: the bytes of every token id (the language lock masks tokens from it)
VOCABULARY = "vocabulary"
#: ``loaded.budget_on_server``: True when the server keeps the thinking budget and the loop stop itself
#: (they are sent with the request, and not counted again here); ``loaded.answer_budget_on_server``: True
#: when it keeps the answer budget too (qvq serve: its stream's pieces are not tokens, so a count of
#: them here would let an answer run past its budget)
SERVER_BUDGET = "server_budget"
#: sessions read ``Prompt.chat`` (the question, system prompt and budgets, for a server that applies its
#: own chat template) rather than the templated ``Prompt.text``
CHAT_MESSAGES = "chat_messages"
#: ``loaded.new_session(sampling, n_ctx=, speculation=SpecSettings)``: the session drafts tokens, checks
#: them in one batched forward pass and rolls its KV cache back past the rejected ones
#: (:mod:`qvq_local.speculate`); ``session.speculation_report()`` says what it did, and
#: ``session.speculation_target()`` hands its cache and sampler to a speculator of one's own (bench).
#: A family with recurrent layers (``Family.recurrent_state``) turns it off with a note.
SPECULATION = "speculation"
#: sessions take ``Prompt.clip`` (a :class:`qvq_local.video.Clip`, its prompt holding one video block) as
#: video natively; without it a clip goes in as frames, one image each with its time before it
VIDEO_INPUT = "video_input"

CAPABILITIES = frozenset(
    {
        LOCAL_KV_CACHE,
        IMAGE_ENCODING,
        REMOTE,
        PREFIX_STATE,
        PARTIAL_PREFIX,
        CHAINS,
        RECURRENT_STATE,
        TOKENIZER,
        VOCABULARY,
        SERVER_BUDGET,
        CHAT_MESSAGES,
        SPECULATION,
        VIDEO_INPUT,
    }
)

# ---------------------------------------------------------------- hooks
# Functions a backend's code offers besides loading a model, by the name a spec's ``hooks`` maps to
# ``"module:function"``.

#: ``machine_facts(facts) -> dict``: what the backend's library says about this machine (GPU offload,
#: its build, where it puts the weights), for ``qvq doctor`` and ``qvq bench``; ``{}`` when the library is
#: not installed.  ``facts`` is :func:`qvq_local.hardware.describe`'s (the platform).
MACHINE_FACTS = "machine_facts"
#: ``load_notices(loaded) -> list[str]``: warnings worth one line each once a model is loaded (an
#: NVIDIA GPU left idle by a CPU-only build, say)
LOAD_NOTICES = "load_notices"
#: ``run_facts(loaded) -> dict``: how a loaded model runs here, each a short phrase or None, for the
#: reports that describe a run (``qvq bench``, ``qvq doctor --selftest``): ``compute`` (how it computes where
#: that differs from its library's own way: ratios against the raw library include it), ``cpu_buffers``
#: (where the weights are held), ``placement`` (which layers run on a GPU), ``summary`` (the few words the
#: self-test line ends with; the backend's title when none), ``image_encoder`` (``"gpu"`` or ``"cpu"``: where
#: images are encoded, which the default image detail follows: :mod:`qvq_local.detail`)
RUN_FACTS = "run_facts"
#: ``crash_advice() -> str``: what to do when the backend's native code crashed the process (its
#: workaround and how to get its log), for the self-test and bench reports; a generic line when none
CRASH_ADVICE = "crash_advice"
HOOKS = frozenset({MACHINE_FACTS, LOAD_NOTICES, RUN_FACTS, CRASH_ADVICE})

#: The word every entry point accepts besides the backend names: let the machine choose.
AUTO = "auto"


def _resolve(path: str) -> Any:
    """``"package.module:Name"`` -> the object (the module imported with importlib)."""
    module, _, attr = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class BackendSpec:
    """One backend: its names, what it loads and needs, what it can do, and where its code is."""

    name: str
    #: the module that runs it, by dotted name: ``open_model(target, options)`` -> a loaded model
    #: (``qvq_local.backends.base.LoadedModel``); ``target`` is the resolved model
    #: (``qvq_local.models.ResolvedModel``), or for a REMOTE backend the model's name there (or None)
    module: str
    #: its load options: a :class:`~qvq_local.backends.options.LoadOptions` type, or its
    #: ``"module:Name"`` (imported when options are built)
    options: type[LoadOptions] | str = LoadOptions
    aliases: tuple[str, ...] = ()
    #: what messages call it ("llama.cpp"); the name when not given
    title: str = ""
    #: model formats it loads (``qvq_local.formats.manifest.Format`` values)
    formats: frozenset[str] = frozenset()
    #: the format ``qvq convert --to`` writes for it (its self-test and bench models are converted to this)
    convert_to: str | None = None
    #: modules that must be importable (checked with ``find_spec``, never imported to check)
    modules: tuple[str, ...] = ()
    #: distributions whose versions ``qvq doctor`` shows (and that key a saved prefix state)
    distributions: tuple[str, ...] = ()
    install_hint: str = "nothing to install"
    capabilities: frozenset[str] = frozenset()
    #: hook name (:data:`HOOKS`) -> ``"module:function"``
    hooks: Mapping[str, str] = field(default_factory=dict)
    #: made for Apple Silicon: ``auto`` prefers it there, and prefers the others everywhere else
    apple_silicon_first: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower() or self.name == AUTO:
            raise ValueError(
                f"a backend's name is lower case, without spaces, and not {AUTO!r}: {self.name!r}"
            )
        unknown = set(self.capabilities) - CAPABILITIES
        if unknown:
            raise ValueError(f"backend {self.name}: unknown capabilities {sorted(unknown)}")
        unknown = set(self.hooks) - HOOKS
        if unknown:
            raise ValueError(f"backend {self.name}: unknown hooks {sorted(unknown)}")
        object.__setattr__(self, "hooks", dict(self.hooks))
        if not self.title:
            object.__setattr__(self, "title", self.name)

    def has(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown backend capability {capability!r}")
        return capability in self.capabilities

    def convert_hint(self) -> str:
        if self.convert_to is None:
            return f"a format it loads ({', '.join(sorted(self.formats)) or 'none'})"
        return f"{self.convert_to.upper()} (qvq convert --to {self.convert_to})"

    def options_type(self) -> type[LoadOptions]:
        return _resolve(self.options) if isinstance(self.options, str) else self.options

    def build_options(
        self, values: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> LoadOptions:
        """Its load options from ``values`` (name -> value), checked; an option it does not take is named."""
        return self.options_type().build(self.name, values, labels)

    def open_model(self, target: Any, options: LoadOptions) -> Any:
        """Load a model (or reach it, for a REMOTE backend): imports the backend's module."""
        return importlib.import_module(self.module).open_model(target, options)

    def hook(self, name: str) -> Any:
        """The function this backend offers for hook ``name``, its module imported; None when it has none."""
        if name not in HOOKS:
            raise ValueError(f"unknown backend hook {name!r}")
        path = self.hooks.get(name)
        return None if path is None else _resolve(path)


#: Every backend by its canonical name, in the order registered (not the machine's preference: see
#: hardware.py).
BACKENDS: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    """Add a backend (the one way: built-in backends and plugins alike).  Registering the same spec again
    does nothing; a name or alias already taken by another backend is a ``ValueError``."""
    if BACKENDS.get(spec.name) == spec:
        return spec
    taken = _by_name()
    for word in (spec.name, *spec.aliases):
        if word in taken or word == AUTO:
            raise ValueError(
                f"cannot register backend {spec.name}: {word!r} already names {taken.get(word, AUTO)}"
            )
    BACKENDS[spec.name] = spec
    return spec


def _by_name() -> dict[str, str]:
    return {alias: spec.name for spec in BACKENDS.values() for alias in (spec.name, *spec.aliases)}


def names(*, remote: bool = False) -> tuple[str, ...]:
    """The canonical names of the backends that run a model here (``remote=True``: the remote ones too)."""
    return tuple(n for n, spec in BACKENDS.items() if remote or REMOTE not in spec.capabilities)


def get(name: str) -> BackendSpec:
    """The entry for a canonical name or an alias (``InputError`` for anything else)."""
    return BACKENDS[canonical(name, allow_auto=False)]


def with_capability(capability: str) -> tuple[BackendSpec, ...]:
    """The backends that have ``capability``, in registration order."""
    return tuple(spec for spec in BACKENDS.values() if spec.has(capability))


def choices(*extra: str, allow_auto: bool = True) -> str:
    """``"auto | mlx | llama"`` for help texts (``extra`` appended, e.g. ``"all"`` for ``qvq bench``)."""
    return " | ".join([*([AUTO] if allow_auto else []), *BACKENDS, *extra])


def canonical(value: str | None, *, allow_auto: bool = True, extra: tuple[str, ...] = ()) -> str:
    """The canonical name for what a user typed (case and spaces ignored; aliases mapped).

    ``None`` or an empty value means ``auto`` where that is allowed.  ``extra`` names more accepted words
    (``qvq bench`` accepts ``all``).  Anything else raises one ``InputError`` listing the choices.
    """
    word = (value or "").strip().lower()
    if not word and allow_auto:
        return AUTO
    if word == AUTO and allow_auto:
        return AUTO
    if word in extra:
        return word
    by_name = _by_name()
    if word in by_name:
        return by_name[word]
    words = [*([AUTO] if allow_auto else []), *BACKENDS, *extra]
    listed = ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    note = alias_note()
    raise InputError(f"unknown backend {value!r}: choose {listed}" + (f" ({note})" if note else ""))


def alias_note() -> str:
    """``"llamacpp, llama.cpp, gguf mean llama"``: the other names users may type."""
    return "; ".join(f"{', '.join(s.aliases)} mean {s.name}" for s in BACKENDS.values() if s.aliases)


def share_options(
    names: list[str] | tuple[str, ...], given: Mapping[str, Any], labels: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Load options ``given`` (name -> value) shared out among the backends ``names`` (canonical): one
    backend gets them all (its options type then names any it does not take); several each get those
    their type takes, and an option none of them takes is an ``InputError`` naming the backends it
    belongs to (``labels``: how the caller spells each option).  The values are not checked here."""
    if len(names) == 1:
        return {names[0]: dict(given)}
    labels = labels or {}
    taken = {name: BACKENDS[name].options_type().names() for name in names}
    for option in given:
        if not any(option in own for own in taken.values()):
            owners = [s.name for s in BACKENDS.values() if option in s.options_type().names()]
            whose = f"an option of the {' and '.join(owners)} backend" if owners else "no backend's option"
            raise InputError(f"{labels.get(option, option)} is {whose}: name the backend to use it")
    return {name: {k: v for k, v in given.items() if k in taken[name]} for name in names}


def preference(apple_silicon: bool) -> tuple[str, ...]:
    """The local backends in the order ``auto`` tries them on this kind of machine."""
    return tuple(sorted(names(), key=lambda n: BACKENDS[n].apple_silicon_first != apple_silicon))


def machine_facts(facts: dict) -> dict:
    """``facts`` (the platform's, :func:`qvq_local.hardware.describe`) with what each backend's
    :data:`MACHINE_FACTS` hook adds; a GPU already found (``metal``/``cuda`` true) stays found."""
    out = dict(facts)
    for spec in BACKENDS.values():
        probe = spec.hook(MACHINE_FACTS)
        if probe is None:
            continue
        for key, value in probe(out).items():
            if value or not out.get(key):
                out[key] = value
    return out


# ---------------------------------------------------------------- the built-in backends

register(
    BackendSpec(
        name="mlx",
        title="MLX",
        module="qvq_local.backends.mlx",
        # mlx-vlm loads an HF folder directly as well as its own
        formats=frozenset({"mlx", "hf"}),
        convert_to="mlx",
        modules=("mlx", "mlx_vlm"),
        distributions=("mlx", "mlx-vlm"),
        install_hint="pip install 'qvq-local[mlx]'",
        capabilities=frozenset(
            {
                LOCAL_KV_CACHE,
                IMAGE_ENCODING,
                PREFIX_STATE,
                CHAINS,
                RECURRENT_STATE,
                TOKENIZER,
                VOCABULARY,
                SPECULATION,
                VIDEO_INPUT,
            }
        ),
        hooks={RUN_FACTS: "qvq_local.backends.mlx:run_facts"},
        apple_silicon_first=True,
    )
)
register(
    BackendSpec(
        name="llama",
        title="llama.cpp",
        module="qvq_local.backends.llamacpp",
        options="qvq_local.backends.llama_buffers:LlamaOptions",
        aliases=("llamacpp", "llama.cpp", "gguf"),
        formats=frozenset({"gguf"}),
        convert_to="gguf",
        modules=("llama_cpp",),
        distributions=("llama-cpp-python",),
        install_hint="pip install 'qvq-local[llama]'",
        capabilities=frozenset(
            {
                LOCAL_KV_CACHE,
                IMAGE_ENCODING,
                PREFIX_STATE,
                PARTIAL_PREFIX,
                CHAINS,
                RECURRENT_STATE,
                TOKENIZER,
                VOCABULARY,
                SPECULATION,
            }
        ),
        hooks={
            MACHINE_FACTS: "qvq_local.backends.llama_buffers:machine_facts",
            LOAD_NOTICES: "qvq_local.backends.llama_buffers:load_notices",
            RUN_FACTS: "qvq_local.backends.llama_buffers:run_facts",
            CRASH_ADVICE: "qvq_local.backends.llama_buffers:crash_advice",
        },
    )
)
# a model behind an OpenAI-compatible server (qvq serve, vLLM, llama-server, QVQ-Max): nothing is loaded
# here and nothing needs installing.
register(
    BackendSpec(
        name="openai",
        title="an OpenAI-compatible server",
        module="qvq_local.backends.openai_remote",
        options=OpenAIOptions,
        install_hint="nothing to install (the openai backend uses the standard library)",
        capabilities=frozenset({REMOTE, SERVER_BUDGET, CHAT_MESSAGES, VIDEO_INPUT}),
    )
)

# last, with everything above defined: a plugin registers through this module while it is imported
from qvq_local import plugins  # noqa: E402

plugins.load()
