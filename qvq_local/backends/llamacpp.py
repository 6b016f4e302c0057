"""The llama.cpp backend: a GGUF text model plus its mmproj, driven through llama-cpp-python's C API.

Why the low-level API and not ``llama_cpp.Llama`` with a chat handler: the reasoning controller needs to
sample one token at a time, append forced text into the same KV cache and read logits, and the image
must be encoded exactly once per question.  The chat handlers re-evaluate the whole prompt (and the
image) on every call; the C API keeps the cache where we left it.

Pieces:

* ``libllama`` holds the text model (this module: :func:`load` checks the pair and loads it into a
  :class:`LlamaModel`) and the KV cache (one ``llama_context`` per question:
  :class:`~qvq_local.backends.llama_session.LlamaSession`);
* ``libmtmd`` holds the vision tower (one ``mtmd_context`` per loaded model); the session tokenises the
  prompt with it and encodes each image once;
* a llama.cpp sampler chain per session (:mod:`qvq_local.backends.llama_runtime`, with the library, its
  log and the context checks the session and its forked chains share).

This module also knows what a loaded pair needs before a session opens: the image grid mtmd resizes an
image to, the KV cells a prompt takes (:meth:`LlamaModel.context_needed`), the sampling defaults the GGUF
and its folder ship.
"""

from __future__ import annotations

import ctypes
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.backends import llama_buffers
from qvq_local.backends.base import Prompt, SamplingParams
from qvq_local.backends.llama_runtime import LOG, libs, load_failure_hint
from qvq_local.backends.llama_session import LlamaSession
from qvq_local.cpu import usable_cores
from qvq_local.errors import ContextOverflow, InputError, ModelError, QvqError
from qvq_local.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    Family,
    family_for_gguf_arch,
    family_for_gguf_pair,
    supported_gguf_archs,
)
from qvq_local.fit import gpu_split
from qvq_local.formats.gguf import (
    GgufHeaderError,
    file_type_name,
    gguf_sampling_keys,
    read_whole_gguf,
    sampling_values,
)

# The text architectures and mmproj projectors this backend runs are the registered families'
# (``qvq_local.families``: family_for_gguf_arch / family_for_gguf_pair).

#: Sessions without an explicit ``n_ctx`` get this many cells (capped at the trained length).
DEFAULT_N_CTX = 8192


# ---------------------------------------------------------------- GGUF header peek (no llama.cpp needed)


def _gguf_sampling(meta: dict) -> dict:
    """Sampling defaults stored in the GGUF's own metadata (``general.sampling.*``), by generation_config name.

    Floats are stored as float32: rounded back to 7 significant digits (0.05, not 0.0500000007).
    """
    found = {}
    for name, key in gguf_sampling_keys().items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        found[name] = int(value) if name == "top_k" else float(f"{float(value):.7g}")
    return found


def _sidecar_generation_config(model_gguf: Path) -> dict:
    """generation_config values shipped next to the GGUF (they override the GGUF's own metadata).

    Looked up in ``generation_config.json`` (the copy of the HF file ``qvq convert`` writes beside the
    GGUF), then under ``"generation_config"`` in the folder's manifest, read by the one manifest reader
    (:func:`qvq_local.formats.manifest.read_manifest`).  Unreadable files are ignored: the defaults are
    QVQ's published values anyway.
    """
    from qvq_local.formats.manifest import read_manifest

    path = model_gguf.parent / "generation_config.json"
    if path.is_file():
        try:
            found = sampling_values(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            found = {}
        if found:
            return found
    try:
        manifest = read_manifest(model_gguf.parent) or {}
    except ModelError:
        return {}
    return sampling_values(manifest.get("generation_config"))


# ---------------------------------------------------------------- image token arithmetic (mirrors mtmd)


def image_grid(
    width: int,
    height: int,
    patch_size: int | None = None,
    merge: int | None = None,
    family: Family = DEFAULT_FAMILY,
) -> tuple[int, int]:
    """(grid_w, grid_h) in merged tokens for an image of ``width`` x ``height``, as mtmd resizes it.

    The family's resize rule (llama.cpp's ``calc_size_preserved_ratio``) within the image-token bounds
    llama.cpp sets for the family's projector.
    """
    patch_size = patch_size or family.patch_size
    merge = merge or family.merge_size
    area = (patch_size * merge) ** 2
    lo, hi = family.llama_image_tokens
    return family.image_grid(
        width, height, min_pixels=lo * area, max_pixels=hi * area, patch_size=patch_size, merge_size=merge
    )


# ---------------------------------------------------------------- the loaded model


@dataclass
class LlamaModel:
    """A GGUF text model and its mmproj in memory (implements ``LoadedModel``)."""

    name: str
    model_path: Path
    mmproj_path: Path
    quantization: str
    chat_template: str | None
    generation_config: dict
    context_length: int
    n_vocab: int
    n_embd: int
    gpu_layers: int  # text layers asked for on the GPU (-1: all), as llama.cpp was given them
    gpu_offload: bool
    patch_size: int
    merge_size: int
    family: Family = DEFAULT_FAMILY
    backend: str = "llama"
    cpu_buffers: Any = None  # the llama_buffers.BufferPlan the weights were loaded with
    n_layers: int = 0  # the text model's blocks (llama.cpp offloads gpu_layers of them + the output layer)
    n_threads: int = field(default_factory=usable_cores)
    _model: Any = None
    _mtmd: Any = None
    _buft_overrides: Any = None
    _sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    _finalizer: Any = None

    def placement(self) -> str:
        """Where the text layers run, counted as llama.cpp counts them (the blocks and the output layer:
        29 for a 28-block model; ``--gpu-layers N`` puts the output layer and the last N - 1 blocks on the
        GPU): ``GPU (all 29 layers)``, ``GPU 14 of 29 layers, CPU the rest`` or ``CPU``."""
        if not self.gpu_offload:
            return "CPU"
        total = self.n_layers + 1
        blocks, output = gpu_split(self.gpu_layers, self.n_layers)
        on_gpu = blocks + output
        if on_gpu >= total:
            return f"GPU (all {total} layers)"
        return f"GPU {on_gpu} of {total} layers, CPU the rest"

    # -- sizing helpers

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(grid_w, grid_h) in merged tokens for one ``width`` x ``height`` image of this model
        (:func:`image_grid` with its patch, merge and family)."""
        return image_grid(width, height, self.patch_size, self.merge_size, self.family)

    def image_token_estimate(self, width: int, height: int) -> int:
        """Image tokens (KV cells) one ``width`` x ``height`` image takes, after mtmd's resize and merge."""
        gw, gh = self.image_grid(width, height)
        return gw * gh

    def image_positions(self, width: int, height: int) -> int:
        """Positions one image advances ``n_pos`` by (M-RoPE: ``max(grid_w, grid_h)``)."""
        return max(self.image_grid(width, height))

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text`` with no BOS; ``special=True`` parses ``<|...|>`` control tokens."""
        llama_cpp, _ = libs()
        self._check_open()
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            raise QvqError(f"llama.cpp could not tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def prefix_identity(self) -> dict:
        """What a saved prefix state of this model must match besides the GGUF itself (the registry's
        ``prefix_state`` capability): the mmproj file, and whether the KV cache was computed on the GPU."""
        return {"files": [self.mmproj_path], "compute": None, "gpu": self.gpu_offload}

    def handles(self) -> tuple[Any, Any]:
        """llama.cpp's handles of this model, for its sessions: the ``llama_model`` and the ``mtmd_context``."""
        self._check_open()
        return self._model, self._mtmd

    def vocab(self) -> Any:
        """llama.cpp's vocabulary handle of this model (for :class:`~llama_runtime.TokenText`)."""
        llama_cpp, _ = libs()
        self._check_open()
        return llama_cpp.llama_model_get_vocab(self._model)

    def token_pieces(self) -> list[bytes]:
        """The bytes of every token id (control tokens: ``b""``), as llama.cpp writes them."""
        llama_cpp, _ = libs()
        self._check_open()
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        buf = ctypes.create_string_buffer(256)
        pieces = []
        for tok in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n + 8)
                n = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
            pieces.append(buf.raw[: max(n, 0)])
        return pieces

    def context_needed(
        self, prompt: Prompt | str, image_sizes: list[tuple[int, int]] | None = None, new_tokens: int = 0
    ) -> int:
        """KV cells a session needs for ``prompt`` plus ``new_tokens`` generated or fed tokens.

        Pass the sum of both budgets and the forced text's length as ``new_tokens``.  Image sizes come
        from ``prompt.images`` (PIL images) when ``prompt`` is a Prompt, else from ``image_sizes``.
        """
        if isinstance(prompt, Prompt):
            text = prompt.text
            sizes = [tuple(img.size) for img in prompt.images] if image_sizes is None else image_sizes
        else:
            text = prompt
            sizes = image_sizes or []
        block = self.family.image_block
        n_blocks = text.count(block)
        if n_blocks != len(sizes):
            raise InputError(f"the prompt has {n_blocks} image block(s) but {len(sizes)} image(s) were given")
        text_tokens = len(
            self.tokenize(text.replace(block, block.replace(self.family.image_pad, "")), special=True)
        )
        image_tokens = sum(self.image_token_estimate(w, h) for (w, h) in sizes)
        return text_tokens + image_tokens + max(0, int(new_tokens))

    # -- sessions

    def new_session(
        self,
        sampling: SamplingParams | None = None,
        *,
        n_ctx: int | None = None,
        n_seq: int = 1,
        speculation: Any = None,
    ) -> LlamaSession:
        """Open a session (one KV cache) of ``n_ctx`` cells; size it with :meth:`context_needed`.

        ``n_seq`` > 1 makes room for that many chains forked from one prefill (:meth:`LlamaSession.fork`);
        ``n_ctx`` then counts the cells of all of them (the prompt's are shared), so the trained-length
        check is the caller's, per chain.  ``speculation``: a
        :class:`~qvq_local.speculate.config.SpecSettings` (the registry's ``speculation`` capability),
        for one chain only.
        """
        self._check_open()
        if n_ctx is None:
            n_ctx = min(DEFAULT_N_CTX, self.context_length) if self.context_length > 0 else DEFAULT_N_CTX
        n_ctx = int(n_ctx)
        if n_ctx <= 0:
            raise InputError(f"n_ctx must be positive, got {n_ctx}")
        if n_seq == 1 and self.context_length > 0 and n_ctx > self.context_length:
            raise ContextOverflow(
                f"the question needs {n_ctx} tokens of context but {self.name} was trained for"
                f" {self.context_length}",
                hint="lower the thinking/answer budgets or the image size",
            )
        resolved = (sampling or SamplingParams()).resolved(self.generation_config, self.family.sampling)
        session = LlamaSession(self, resolved, n_ctx, n_seq=n_seq, speculation=speculation)
        self._sessions.add(session)
        return session

    def close(self) -> None:
        """Free every open session, then the vision context and the model (idempotent)."""
        if self._model is None:
            return
        for session in list(self._sessions):
            session.close()
        self._model = None
        self._mtmd = None
        if self._finalizer is not None:
            self._finalizer()  # frees the handles exactly once (also run at GC or interpreter exit)

    def _check_open(self) -> None:
        if self._model is None:
            raise RuntimeError("this model was closed")


def _free_model(llama_cpp: Any, mtmd_cpp: Any, model: Any, mctx: Any) -> None:
    mtmd_cpp.mtmd_free(mctx)
    llama_cpp.llama_model_free(model)


def _check_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{what} not found", path=path)
    if not path.is_file():
        raise ModelError(f"{what} is not a file", path=path)
    return path


def _read_checked_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The key/values and tensor records of a GGUF file whose tensors all lie inside it, from one pass
    over its header (:func:`qvq_local.formats.gguf.read_whole_gguf`).

    Refuses a file cut short (an interrupted download or copy) with a message that says so and names the
    file; llama.cpp would only say "failed to load model".  Reads the header only, never tensor data.
    """
    try:
        header = read_whole_gguf(path)
    except GgufHeaderError as err:
        raise ModelError(str(err), path=path) from None
    return {"__n_tensors__": header.n_tensors, **header.fields}, header.tensors


def _load_logged(load: Any, free: Any, what: str, path: Path, gpu_layers: int) -> Any:
    """``load()`` (a llama.cpp call returning a handle, NULL on failure) with its log lines caught: a
    Ctrl-C that arrived inside it is raised once it returns (the handle freed), and a NULL becomes a
    ModelError naming ``path`` with llama.cpp's own last error (and the GPU hint when memory ran out)."""
    LOG.clear()
    handle = load()
    if LOG.pending is not None:
        if handle:
            free(handle)
        LOG.reraise()
    if not handle:
        why = LOG.last_error() or f"corrupt or unsupported {what}"
        raise ModelError(
            f"llama.cpp could not load this {what}: {why}",
            path=path,
            hint=load_failure_hint(" ".join(LOG.errors), gpu_layers),
        )
    return handle


def open_model(resolved: Any, options: llama_buffers.LlamaOptions) -> LlamaModel:
    """The registry's ``open_model`` for this backend: a resolved GGUF model (``qvq_local.models``) and
    its mmproj, with the backend's checked load options."""
    if resolved.mmproj is None:
        raise ModelError("no vision projector (mmproj) for this GGUF model", path=resolved.path)
    return load(resolved.path, resolved.mmproj, options, name=resolved.name)


def load(
    model_gguf: str | Path,
    mmproj_gguf: str | Path | None,
    options: llama_buffers.LlamaOptions | None = None,
    *,
    name: str | None = None,
    generation_config: dict | None = None,
    n_threads: int | None = None,
) -> LlamaModel:
    """Load a Qwen2-VL GGUF text model and its mmproj.

    ``options``: the backend's load options (None: ``LlamaOptions()``, the environment's or the
    defaults).  Their ``gpu_layers``: text layers on the GPU; None puts every layer on the GPU when
    llama.cpp reports GPU offload support and keeps them on the CPU otherwise; -1 means all
    (:func:`llama_buffers.requested_gpu_layers`).  ``generation_config`` overrides the sampling
    defaults (otherwise read from a sidecar ``generation_config.json`` or manifest, then from the GGUF's
    ``general.sampling.*`` keys, else QVQ's values).
    Errors name the file: a missing, corrupt or wrong-architecture GGUF, and a missing or mismatched
    mmproj, raise ModelError; a missing llama-cpp-python raises BackendUnavailable.
    """
    model_path = _check_file(Path(model_gguf), "GGUF model file")
    if mmproj_gguf is None:
        raise ModelError(
            "no mmproj (vision projector) GGUF was given for this model; the image cannot be read without it",
            path=model_path,
        )
    mmproj_path = _check_file(Path(mmproj_gguf), "mmproj GGUF file")

    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

    clip = MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]  # "clip": the architecture every mmproj file declares
    meta, tensors = _read_checked_gguf(model_path)
    arch = meta.get(Keys.General.ARCHITECTURE)
    if arch == clip:
        raise ModelError("this is an mmproj (vision projector) file, not the text model", path=model_path)
    family = family_for_gguf_arch(arch)
    if family is None:
        raise ModelError(
            f"GGUF architecture is {arch!r}, not a model qvq-local runs ({', '.join(supported_gguf_archs())})",
            path=model_path,
        )
    pmeta, _ = _read_checked_gguf(mmproj_path)
    if pmeta.get(Keys.General.ARCHITECTURE) != clip:
        raise ModelError(
            f"not an mmproj file: its architecture is {pmeta.get(Keys.General.ARCHITECTURE)!r}, expected {clip!r}",
            path=mmproj_path,
        )
    projector = pmeta.get(Keys.Clip.PROJECTOR_TYPE) or pmeta.get(Keys.ClipVision.PROJECTOR_TYPE)
    # Families share a text architecture (Qwen2.5-VL's text GGUF is ``qwen2vl`` too) or a projector
    # (Qwen3.5's and Qwen3-VL MoE's mmproj is Qwen3-VL's ``qwen3vl_merger``): the pair says which it is.
    pair = family_for_gguf_pair(arch, projector)
    if pair is None:
        expected = " or ".join(
            dict.fromkeys(f.gguf_projector for f in FAMILIES.values() if f.gguf_text_arch == arch)
        )
        raise ModelError(f"mmproj projector type is {projector!r}, expected {expected}", path=mmproj_path)
    family = pair

    options = options if options is not None else llama_buffers.LlamaOptions()
    llama_cpp, mtmd_cpp = libs()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    gpu_layers = options.gpu_layers
    if gpu_layers is None:
        gpu_layers = -1 if gpu else 0
    threads = int(n_threads or usable_cores())

    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = int(gpu_layers)
    buffers, overrides = llama_buffers.apply(
        mparams, llama_buffers.plan_here(llama_cpp, options.cpu_buffers, tensors), llama_cpp
    )
    model = _load_logged(
        lambda: llama_cpp.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams),
        llama_cpp.llama_model_free,
        "GGUF",
        model_path,
        gpu_layers if gpu else 0,
    )

    try:
        n_embd = int(llama_cpp.llama_model_n_embd(model))
        proj_dim = pmeta.get(Keys.ClipVision.PROJECTION_DIM)
        if proj_dim is not None and int(proj_dim) != n_embd:
            raise ModelError(
                f"this mmproj projects to width {proj_dim} but the text model {model_path.name} is {n_embd} wide;"
                " it belongs to another model",
                path=mmproj_path,
            )
        cparams = mtmd_cpp.mtmd_context_params_default()
        cparams.use_gpu = gpu and gpu_layers != 0
        cparams.print_timings = False
        cparams.n_threads = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # mtmd's "warmup" only reserves the encoder's compute buffers, sized for its largest image (no
        # compute pass); without it the first encode reserves for the image at hand.  Measured on the 2b
        # shape (CPU): the first image costs the same CPU time either way, and warmup adds ~40 MB at load.
        cparams.warmup = False
        mctx = _load_logged(
            lambda: mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode("utf-8"), model, cparams),
            mtmd_cpp.mtmd_free,
            "mmproj",
            mmproj_path,
            gpu_layers if gpu else 0,
        )
        if not mtmd_cpp.mtmd_support_vision(mctx):
            mtmd_cpp.mtmd_free(mctx)
            raise ModelError("this mmproj has no vision encoder", path=mmproj_path)
    except BaseException:
        llama_cpp.llama_model_free(model)
        raise

    def meta_str(key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    file_type = meta_str(Keys.General.FILE_TYPE)
    quantization = (
        file_type_name(int(file_type), llama_cpp) if file_type and file_type.isdigit() else "unknown"
    )
    ctx_len = meta_str(Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    gen = {**_gguf_sampling(meta), **_sidecar_generation_config(model_path), **(generation_config or {})}
    vocab = llama_cpp.llama_model_get_vocab(model)
    loaded = LlamaModel(
        name=name or meta_str(Keys.General.NAME) or model_path.stem,
        model_path=model_path,
        mmproj_path=mmproj_path,
        quantization=quantization,
        chat_template=meta_str(Keys.Tokenizer.CHAT_TEMPLATE),
        generation_config=gen,
        context_length=int(ctx_len)
        if ctx_len and ctx_len.isdigit()
        else int(llama_cpp.llama_model_n_ctx_train(model)),
        n_vocab=int(llama_cpp.llama_vocab_n_tokens(vocab)),
        n_embd=n_embd,
        gpu_layers=int(gpu_layers),
        gpu_offload=gpu and gpu_layers != 0,
        n_layers=int(llama_cpp.llama_model_n_layer(model)),
        patch_size=int(pmeta.get(Keys.ClipVision.PATCH_SIZE, family.patch_size)),
        merge_size=int(pmeta.get(Keys.ClipVision.SPATIAL_MERGE_SIZE, family.merge_size)),
        family=family,
        n_threads=threads,
        cpu_buffers=buffers,
    )
    loaded._model = model
    loaded._mtmd = mctx
    loaded._buft_overrides = overrides  # llama.cpp keeps a pointer to them in the model's params
    loaded._finalizer = weakref.finalize(loaded, _free_model, llama_cpp, mtmd_cpp, model, mctx)
    return loaded
