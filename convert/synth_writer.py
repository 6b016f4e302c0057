"""The synthesiser's per-family writers: their base, and the registry by family name.

A synthetic checkpoint (``convert/synthetic.py``) is random weights in exactly a family's published
layout.  The weights' names and shapes are the family's own facts (``Family.expected_shapes`` of the
dims its config.json gives); what differs from family to family besides is written by a
:class:`SynthWriter` subclass registered under the family's name with :func:`register` (``config.json``,
``preprocessor_config.json``, the tokenizer and template files), overriding what differs from the class
it extends (``super()`` first where it adds to it).

The built-in families' writers live in ``convert/synth_<family>.py`` and are imported by name on the
first lookup; a plugin family registers its own from its plugin function (``QVQ_PLUGINS`` or an entry
point, run when ``qvq_local.families``, which this module imports, is first imported: so any process
that synthesises sees it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

from qvq_local.errors import InputError
from qvq_local.families import Family

#: Family name -> its writer class (add with :func:`register`; look up with :func:`writer_for`).
WRITERS: dict[str, type[SynthWriter]] = {}

#: The modules of the built-in families' writers, imported on the first lookup.
_BUILT_IN = ("synth_qwen2vl", "synth_qwen2_5vl", "synth_qwen3vl", "synth_qwen3vl_moe", "synth_qwen3_5")


def register(*family_names: str) -> Callable[[type[SynthWriter]], type[SynthWriter]]:
    """Class decorator: register the class as the synthetic checkpoint writer of the families named."""

    def add(cls: type[SynthWriter]) -> type[SynthWriter]:
        if not (isinstance(cls, type) and issubclass(cls, SynthWriter)):
            raise TypeError(f"register() decorates a SynthWriter subclass, not {cls!r}")
        for name in family_names:
            if WRITERS.get(name, cls) is not cls:
                raise ValueError(f"a synthetic checkpoint writer for {name!r} is already registered")
            WRITERS[name] = cls
        return cls

    return add


def writer_for(family: Family) -> SynthWriter:
    """The registered writer of ``family``'s synthetic checkpoints, bound to it."""
    for module in _BUILT_IN:
        importlib.import_module(f"{__package__}.{module}")
    cls = WRITERS.get(family.name)
    if cls is None:
        raise InputError(f"no synthetic checkpoint writer is registered for {family.name}")
    return cls(family)


class SynthWriter:
    """The files of one family's synthetic checkpoint besides its weights."""

    #: Chat-template variants a checkpoint can carry, the default first (Qwen3-VL: thinking, instruct);
    #: empty: one template.
    variants: ClassVar[tuple[str, ...]] = ()
    #: ``transformers_version`` in the family's published config.json and generation_config.json.
    transformers_version: ClassVar[str]

    def __init__(self, family: Family):
        self.family = family

    def config(self, shape: Any, ids: dict[str, int], torch_dtype: str) -> dict[str, Any]:
        """config.json of a checkpoint of ``shape`` (``ids``: the special tokens' ids)."""
        raise NotImplementedError

    def preprocessor_config(self, shape: Any) -> dict[str, Any]:
        """preprocessor_config.json."""
        raise NotImplementedError

    def tokenizer_files(self, shape: Any, kind: str, variant: str | None) -> dict[str, str]:
        """The tokenizer and chat-template files, name -> text (``kind``: a ``tokenizer_synth.KINDS``
        entry; ``variant``: one of :attr:`variants`, or None)."""
        raise NotImplementedError
