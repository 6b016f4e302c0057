"""How a backend is loaded: each backend's load options are one small frozen type, checked once.

A backend names its options type in its :class:`~qvq_local.backends.registry.BackendSpec`.  The type is a
frozen dataclass deriving from :class:`LoadOptions`; its constructor checks and normalises every value
(so an object that exists is a valid one) and names a bad value the way the caller spelt it (``labels``:
``--gpu-layers`` on the command line, ``gpu_layers`` from Python).  :meth:`LoadOptions.build` refuses a
name the type does not have, naming it and the ones it has.  The mlx backend takes none (the base type).

The openai backend's options live here, with the server kinds, because ``qvq config`` checks the
``server_kind`` setting and must not import a backend to do so.  The llama backend's
(:class:`qvq_local.backends.llama_buffers.LlamaOptions`) live beside the buffer and layer rules they apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from qvq_local.errors import InputError


@dataclass(frozen=True)
class LoadOptions:
    """A backend's load options (this base: none).  Subclasses add fields and check them in
    ``__post_init__``; ``labels`` maps a field to how the caller spells it in messages."""

    labels: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False, kw_only=True)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names this type takes."""
        return tuple(f.name for f in fields(cls) if f.name != "labels")

    @classmethod
    def build(
        cls, backend: str, values: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> LoadOptions:
        """The options ``values`` (name -> value) for ``backend``: an ``InputError`` names the first option
        this backend does not take, then the constructor checks the values."""
        labels = dict(labels or {})
        taken = cls.names()
        for name in values:
            if name not in taken:
                own = ", ".join(labels.get(n, n) for n in taken) or "none"
                raise InputError(
                    f"the {backend} backend has no option {labels.get(name, name)} (its options: {own})"
                )
        return cls(**values, labels=labels)

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising inside the frozen constructor


# ---------------------------------------------------------------- the openai backend's

#: The kinds of server the openai backend knows how to drive (``--server-kind``; see openai_remote.py).
SERVER_KINDS = ("auto", "qvq", "qvq-max", "vllm", "llama-server", "generic")


def check_kind(value: str | None) -> str:
    """A server kind, lower case (None or empty: ``auto``); ``InputError`` for one not in SERVER_KINDS."""
    word = (value or "auto").strip().lower()
    if word not in SERVER_KINDS:
        raise InputError(f"unknown server kind {value!r}: choose {', '.join(SERVER_KINDS)}")
    return word


@dataclass(frozen=True)
class OpenAIOptions(LoadOptions):
    """``base_url``: the server (``http://127.0.0.1:8000/v1``; None: the ``base_url`` setting, which the
    API fills in); ``api_key``: its key (None: the environment's, see openai_remote); ``server_kind``: one
    of :data:`SERVER_KINDS` (None: the ``server_kind`` setting, else auto)."""

    base_url: str | None = None
    api_key: str | None = None
    server_kind: str | None = None

    def __post_init__(self) -> None:
        if self.base_url is not None:
            url = str(self.base_url).strip().rstrip("/")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InputError(f"{self.label('base_url')} must be an http(s) URL, got {self.base_url!r}")
            self._set("base_url", url)
        if self.api_key is not None and not str(self.api_key).strip():
            self._set("api_key", None)
        self._set("server_kind", check_kind(self.server_kind))


__all__ = ["SERVER_KINDS", "LoadOptions", "OpenAIOptions", "check_kind"]
