"""The backends qvq-local can run a model on: one entry each, read by every place that names a backend.

Why one table: the names a user may type (``--backend``, ``qvq config set backend``, ``QVQ_BACKEND``,
``qvq bench``), the model formats each backend loads, the ``pip install`` line shown when it is missing,
the modules that must be importable, and how it is loaded were once written in eight modules, and the
copies disagreed (``llamacpp`` was accepted by ``qvq ask`` and refused by ``qvq config``).  Adding a
backend now means one :class:`BackendSpec` here plus its module under ``qvq_local/backends/``.

This module imports nothing heavy: ``qvq --help`` reads it for its help text.  A backend's library is only
imported by its ``loader``, when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qvq_local.errors import InputError, ModelError

#: What a backend can do, as the rest of the code asks it.
LOCAL_KV_CACHE = "local_kv_cache"  # keeps the KV cache in this process (prefill once, feed forced text)
IMAGE_ENCODING = "image_encoding"  # encodes images itself (vision tower in process)
REMOTE = "remote"  # talks to a server instead of loading weights here
#: prefill(prompt, keep_prefix=True) / prefill(prompt, prefix=state): the image prefix's KV state is
#: exported and restored (qvq_local.prefix_cache reuses it across questions about the same image)
PREFIX_STATE = "prefix_state"
CAPABILITIES = frozenset({LOCAL_KV_CACHE, IMAGE_ENCODING, REMOTE, PREFIX_STATE})

#: The word every entry point accepts besides the backend names: let the machine choose.
AUTO = "auto"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: its name, the other names users type for it, and what it needs and loads."""

    name: str
    aliases: tuple[str, ...]
    #: model formats it loads (``qvq_local.formats.manifest.Format`` values)
    formats: frozenset[str]
    #: the format ``qvq convert --to`` writes for it (its self-test and bench models are converted to this)
    convert_to: str
    #: modules that must be importable (checked with ``find_spec``, never imported to check)
    modules: tuple[str, ...]
    #: distributions whose versions ``qvq doctor`` shows
    distributions: tuple[str, ...]
    install_hint: str
    capabilities: frozenset[str]
    #: ``loader(resolved_model, n_gpu_layers=..., cpu_buffers=...)`` -> a loaded model; imports the library
    loader: Callable[..., Any]
    #: made for Apple Silicon: ``auto`` prefers it there, and prefers the others everywhere else
    apple_silicon_first: bool = False

    def has(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown backend capability {capability!r}")
        return capability in self.capabilities

    def convert_hint(self) -> str:
        return f"{self.convert_to.upper()} (qvq convert --to {self.convert_to})"


def _load_mlx(resolved: Any, *, n_gpu_layers: int | None = None, cpu_buffers: str | None = None) -> Any:
    from qvq_local.backends import mlx

    return mlx.load(resolved.path, name=resolved.name)


def _load_llama(resolved: Any, *, n_gpu_layers: int | None = None, cpu_buffers: str | None = None) -> Any:
    from qvq_local.backends import llamacpp

    if resolved.mmproj is None:
        raise ModelError("no vision projector (mmproj) for this GGUF model", path=resolved.path)
    return llamacpp.load(
        resolved.path, resolved.mmproj, n_gpu_layers=n_gpu_layers, name=resolved.name, cpu_buffers=cpu_buffers
    )


#: The kinds of server the openai backend knows how to drive (``--server-kind``; see openai_remote.py).
SERVER_KINDS = ("auto", "qvq", "qvq-max", "vllm", "llama-server", "generic")


def _connect_remote(
    model: str | None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    server_kind: str | None = None,
) -> Any:
    from qvq_local.backends import openai_remote

    return openai_remote.connect(model, base_url=base_url, api_key=api_key, server_kind=server_kind)


_SPECS = (
    BackendSpec(
        name="mlx",
        aliases=(),
        # mlx-vlm loads an HF folder directly as well as its own
        formats=frozenset({"mlx", "hf"}),
        convert_to="mlx",
        modules=("mlx", "mlx_vlm"),
        distributions=("mlx", "mlx-vlm"),
        install_hint="pip install 'qvq-local[mlx]'",
        capabilities=frozenset({LOCAL_KV_CACHE, IMAGE_ENCODING, PREFIX_STATE}),
        loader=_load_mlx,
        apple_silicon_first=True,
    ),
    BackendSpec(
        name="llama",
        aliases=("llamacpp", "llama.cpp", "gguf"),
        formats=frozenset({"gguf"}),
        convert_to="gguf",
        modules=("llama_cpp",),
        distributions=("llama-cpp-python",),
        install_hint="pip install 'qvq-local[llama]'",
        capabilities=frozenset({LOCAL_KV_CACHE, IMAGE_ENCODING, PREFIX_STATE}),
        loader=_load_llama,
    ),
    # a model behind an OpenAI-compatible server (qvq serve, vLLM, llama-server, QVQ-Max): nothing is loaded
    # here and nothing needs installing; its loader is ``loader(model_name, base_url=, api_key=,
    # server_kind=)``.  ``auto`` never picks it, and local-only places (bench, self-test) skip it.
    BackendSpec(
        name="openai",
        aliases=(),
        formats=frozenset(),
        convert_to="gguf",
        modules=(),
        distributions=(),
        install_hint="nothing to install (the openai backend uses the standard library)",
        capabilities=frozenset({REMOTE}),
        loader=_connect_remote,
    ),
)

#: Every backend by its canonical name, in a fixed order (not the machine's preference: see hardware.py).
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in _SPECS}
_BY_NAME: dict[str, str] = {alias: spec.name for spec in _SPECS for alias in (spec.name, *spec.aliases)}


def names(*, remote: bool = False) -> tuple[str, ...]:
    """The canonical names of the backends that run a model here (``remote=True``: the remote ones too)."""
    return tuple(n for n, spec in BACKENDS.items() if remote or REMOTE not in spec.capabilities)


def get(name: str) -> BackendSpec:
    """The entry for a canonical name or an alias (``InputError`` for anything else)."""
    return BACKENDS[canonical(name, allow_auto=False)]


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
    if word in _BY_NAME:
        return _BY_NAME[word]
    words = [*([AUTO] if allow_auto else []), *BACKENDS, *extra]
    listed = ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    raise InputError(f"unknown backend {value!r}: choose {listed} ({alias_note()})")


def alias_note() -> str:
    """``"llamacpp, llama.cpp, gguf mean llama"``: the other names users may type."""
    return "; ".join(f"{', '.join(s.aliases)} mean {s.name}" for s in _SPECS if s.aliases)


def preference(apple_silicon: bool) -> tuple[str, ...]:
    """The backends in the order ``auto`` tries them on this kind of machine."""
    return tuple(sorted(BACKENDS, key=lambda n: BACKENDS[n].apple_silicon_first != apple_silicon))
