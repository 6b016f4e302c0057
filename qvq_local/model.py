"""A loaded model, as the Python API hands it out: :class:`Model`.

    import qvq_local
    with qvq_local.load("~/models/qvq-q4") as model:          # qvq_local.api.load
        for event in model.stream(["chart.png"], "Which bar is highest?", think_budget=512):
            ...                                               # Started, TextDelta, Forced, Finished
        result = model.ask("chart.png", "Which bar is highest?", think_budget=512)
    print(result.answer, result.boxed, result.stop_reason, result.timings)

What it holds besides the backend's loaded object: its name, backend (registry entry), quantization, the
image bound it was loaded with (a pixel bound or a detail level; else the machine's default level), the prefix caches kept across questions and the language lock's script
table.  A question's options become one :class:`~qvq_local.settings.AskSettings`; the question itself runs
in :mod:`qvq_local.question`, and :meth:`Model.ask` drives it to its Result (:func:`qvq_local.driver.drive`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qvq_local.backends import registry
from qvq_local.detail import AUTO, Choice, ImageBound, Machine, check_level, image_bound, machine_default
from qvq_local.driver import drive
from qvq_local.errors import InputError, ModelError
from qvq_local.events import Event, Result
from qvq_local.question import stream_question

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

    from qvq_local.families import Family
    from qvq_local.settings import AskSettings


class Model:
    """A loaded model.  Open with :func:`qvq_local.api.load`; close with :meth:`close` or a ``with`` block.

    ``loaded``: the backend's loaded model (``qvq_local.backends.base.LoadedModel``); ``spec``: its
    backend's registry entry (what the loaded object can do is asked of it).
    """

    def __init__(
        self,
        loaded: Any,
        *,
        name: str,
        spec: registry.BackendSpec,
        quantization: str,
        path: Path | None = None,
        max_pixels: int | None = None,
        detail: str | None = None,
        load_s: float = 0.0,
    ):
        self.loaded = loaded
        self.name = name
        self.spec = spec
        self.backend = spec.name
        self.quantization = quantization
        self.path = path
        # the bound of its questions' images when a question sets neither max_pixels nor detail: a pixel
        # bound, else a detail level (None: the default level of the machine that encodes, :meth:`machine`)
        self.max_pixels = max_pixels
        level = None if detail is None else check_level(detail, "detail")
        self.detail = None if level == AUTO else level
        self._machine: Machine | None = None  # where this model encodes images, found once
        self.load_s = load_s
        #: a loaded draft model of the same backend (``load(draft=...)``, ``--draft``): its guesses are
        #: checked by this model when a question speculates (``speculate="draft"`` or ``"auto"``)
        self.draft: Any = None
        self._vocab_scripts = None  # qvq_local.lang.VocabScripts of this model's tokenizer, built once
        self.lang_index_s = 0.0  # seconds that took
        # Prefix reuse (qvq_local.prefix_cache): the KV state after the system prompt and image(s) is kept
        # in memory across asks (LRU, capped in bytes); set ``disk_cache`` to keep it on disk too (the CLI
        # does), either to None to turn that part off.  ``cache_notice`` gets one-line notices.
        from qvq_local.prefix_cache import MemoryCache

        self.prefix_cache: MemoryCache | None = MemoryCache()
        self.disk_cache = None  # qvq_local.prefix_cache.DiskCache | None
        self.cache_notice: Callable[[str], None] = lambda line: None

    @property
    def context_length(self) -> int:
        return int(getattr(self.loaded, "context_length", 0) or 0)

    @property
    def family(self) -> Family:
        """The model's family (llama.cpp models carry it; MLX ones name it by model_type; else the default):
        its image grid, control tokens, system prompt and sampling fallback."""
        from qvq_local.families import DEFAULT_FAMILY, family_for_model_type

        family = getattr(self.loaded, "family", None)
        if family is None:
            family = family_for_model_type((getattr(self.loaded, "config", None) or {}).get("model_type"))
        return family or DEFAULT_FAMILY

    @property
    def machine_class(self) -> str:
        """``"gpu"`` where this model's vision work runs on a GPU (its backend encodes images on one, Apple
        Silicon, a remote server), else ``"cpu"``: the class a clip's default token budget follows
        (:func:`qvq_local.video.video_token_default`).  The same fact as the image detail's default
        (:meth:`machine`), so a clip and an image agree on where they are encoded."""
        machine = self.machine()
        return "gpu" if machine.encoder in ("gpu", "remote") or machine.apple_silicon else "cpu"

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.backend!r}, quantization={self.quantization!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
            self.draft = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    def notices(self) -> list[str]:
        """Warnings about how the model was loaded, one line each (its backend's ``load_notices`` hook)."""
        hook = self.spec.hook(registry.LOAD_NOTICES)
        return list(hook(self.loaded)) if hook is not None and self.loaded is not None else []

    def run_facts(self) -> dict:
        """How the model runs here, each a short phrase or None (its backend's ``run_facts`` hook:
        ``compute``, ``cpu_buffers``, ``placement``, ``summary``); ``{}`` for a backend without one."""
        hook = self.spec.hook(registry.RUN_FACTS)
        return dict(hook(self.loaded)) if hook is not None and self.loaded is not None else {}

    # ------------------------------------------------------------------ one question
    def stream(self, images: Any, question: str, *, history: Any = None, **options: Any) -> Iterator[Event]:
        """Ask ``question`` about ``images`` (paths or :class:`~qvq_local.images.PreparedImage`); yield events
        as they come (:func:`qvq_local.question.stream_question` runs the question).

        The options (keywords) are :class:`qvq_local.settings.AskSettings`' with the sampling ones flat:
        ``think_budget`` caps thought tokens (None: up to :data:`qvq_local.budgets.DEFAULT_MAX_THOUGHT`, or
        what the context holds); ``answer_budget`` caps answer tokens.  ``system`` replaces the model family's system prompt
        (QVQ's for Qwen2-VL models; Qwen3-VL has none; ``""`` leaves the template's own default).  Sampling
        values left at None come from the model's generation_config.  ``forced_text`` (fed when thinking is
        cut) defaults to what suits the model and
        the question: ``</think>`` when the chat template opens ``<think>``, else QVQ's marker, after a
        sentence in the question's language (:func:`qvq_local.splitter.default_forced_text`).
        ``lang_lock`` (auto|on|off, see :mod:`qvq_local.lang`) keeps the thought in the question's scripts.
        ``samples`` > 1 runs that many reasoning chains from one prefill, decoded in one batch, each with
        its own budget, loop stop and forced answer; events of each chain come as ``ChainEvent`` and the
        ``Finished`` Result is the majority ``\\boxed{}`` answer's chain with every chain under ``chains``
        (:mod:`qvq_local.chains`; the backends with the registry's ``chains`` capability).  ``max_tokens``
        caps thought and answer together.
        ``history``: the turns of the conversation before this question (:class:`qvq_local.conversation.Turn`,
        or dicts with ``role``, ``text`` and ``images``): user turns with their images, assistant turns
        with their replies, of which the model is shown the answer alone (the reasoning dropped, as Qwen's
        templates drop it).  ``images`` may then be empty when earlier turns hold the images.  Their images
        stay in the prefix cache, so a follow-up about the same image does not encode it again.  The
        budgets are this question's.  (QVQ-72B-Preview was trained for single-round dialogue; later turns
        are answered all the same.)
        The options become one :class:`qvq_local.settings.AskSettings` (:meth:`~AskSettings.build`),
        checked there (``InputError`` before anything runs; an unknown option is a ``TypeError``).  The
        last event is always ``Finished``.
        """
        from qvq_local.settings import AskSettings

        return self.stream_settings(images, question, AskSettings.build(options), history=history)

    def stream_settings(
        self, images: Any, question: str, settings: AskSettings, *, history: Any = None
    ) -> Iterator[Event]:
        """:meth:`stream` with its options already built and checked (:class:`qvq_local.settings.AskSettings`).

        The images are bounded by :meth:`image_bound` (``settings.max_pixels``, else ``settings.detail``,
        else this model's own, else this machine's default level).
        """
        from qvq_local import lang
        from qvq_local.conversation import check_history
        from qvq_local.settings import check_text

        if self.loaded is None:
            raise ModelError("this model was closed; load it again")
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        check_text(question, "the question")
        turns = check_history(history)
        for i, turn in enumerate(turns):
            check_text(turn.text, f"history[{i}]")
        lock = lang.decide(question, settings.lang_lock)
        bound = self.image_bound(settings)
        settings = replace(settings, max_pixels=bound.max_pixels)
        return stream_question(self, images, question, settings, lock, bound, turns)

    def image_bound(self, settings: AskSettings | None = None) -> ImageBound:
        """How a question's images are bounded on this model's grid (:mod:`qvq_local.detail`): the
        question's pixel bound, else its detail level, else the model's own (``max_pixels``, ``detail`` at
        load), else the default level of the machine that encodes them (:meth:`machine`).  A pixel bound
        wins over a level given in the same place."""
        from qvq_local.settings import API_LABELS

        family = self.family
        if settings is not None:
            label = {**API_LABELS, **settings.labels}.get
            if settings.max_pixels is not None:
                return image_bound(family, pixels=settings.max_pixels, source=str(label("max_pixels")))
            if settings.detail is not None:
                return image_bound(family, Choice(settings.detail, str(label("detail"))))
        if self.max_pixels is not None:
            return image_bound(family, pixels=self.max_pixels, source="the model's max_pixels")
        if self.detail is not None:
            return image_bound(family, Choice(self.detail, "the model's detail"))
        return image_bound(family, machine_default(self.machine()))

    def machine(self) -> Machine:
        """Where this model's images are encoded (:class:`qvq_local.detail.Machine`): on a server for a remote
        backend, else where its backend says (the ``run_facts`` hook's ``image_encoder``), with this
        process's cores and whether this is an Apple Silicon Mac.  Found once."""
        if self._machine is None:
            from qvq_local.cpu import usable_cores
            from qvq_local.hardware import is_apple_silicon

            encoder = "remote" if self.spec.has(registry.REMOTE) else self.run_facts().get("image_encoder")
            facts = {"usable_cores": usable_cores(), "apple_silicon": is_apple_silicon()}
            self._machine = Machine.from_facts(facts, encoder)
        return self._machine

    def language_mask(self, lock) -> tuple[Any, dict]:
        """The token mask for a language lock, and what to record in the settings.

        The script table is built once per loaded model (its tokenizer) and kept; each lock's mask once
        per script set.  A backend that cannot list its vocabulary runs unlocked, and says so.
        """
        if lock is None:
            return None, {"scripts": None}
        if not self.spec.has(registry.VOCABULARY):
            return None, {"scripts": None, "unavailable": "the backend cannot list its vocabulary"}
        if self._vocab_scripts is None:
            from qvq_local.lang import VocabScripts

            t = time.perf_counter()
            self._vocab_scripts = VocabScripts(self.loaded.token_pieces())
            self.lang_index_s = time.perf_counter() - t
        mask = self._vocab_scripts.mask(lock.allowed)
        return mask, {"scripts": sorted(lock.allowed), "masked": mask.label, "masked_tokens": len(mask)}

    def ask(self, images: Any, question: str, **options: Any) -> Result:
        """Ask and wait: the same options (and ``history``) as :meth:`stream`; returns the final :class:`Result`.

        On Ctrl-C the ``KeyboardInterrupt`` propagates with the partial result as its ``result`` attribute.
        """
        return drive(self.stream(images, question, **options))
