"""The llama.cpp backend: a GGUF text model plus its mmproj, driven through llama-cpp-python's C API.

Why the low-level API and not ``llama_cpp.Llama`` with a chat handler: the reasoning controller needs to
sample one token at a time, append forced text into the same KV cache and read logits, and the image
must be encoded exactly once per question.  The chat handlers re-evaluate the whole prompt (and the
image) on every call; the C API keeps the cache where we left it.

Pieces:

* ``libllama`` holds the text model and the KV cache (one ``llama_context`` per session);
* ``libmtmd`` holds the vision tower (one ``mtmd_context`` per loaded model).  ``mtmd_tokenize`` splits
  the prompt into text chunks and image chunks; each image chunk is encoded once (``mtmd_encode_chunk``,
  timed on its own) and its embeddings decoded into the KV cache (``mtmd_helper_decode_image_chunk``);
* a llama.cpp sampler chain (penalties, top-k, top-p, temperature, seeded draw; greedy when the settings
  make it deterministic).

M-RoPE matters for bookkeeping: an image advances the position counter by ``max(grid_h, grid_w)`` but
stores one KV cell per image token.  ``n_pos`` counts positions (where the next token goes);
``n_cells`` counts cells (what fills ``n_ctx``), and the Session protocol's ``n_past`` is that count.
Overflow is checked against cells, before decoding, and
raised as :class:`~qvq_local.errors.ContextOverflow`.
"""

from __future__ import annotations

import ctypes
import json
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.backends import llama_buffers, llama_chains
from qvq_local.backends.base import (
    PrefillStats,
    PrefixState,
    Prompt,
    SamplingParams,
    Token,
    TokenMask,
)
from qvq_local.backends.llama_runtime import LOG, Sampler, TokenText, check_room, libs
from qvq_local.cpu import usable_cores
from qvq_local.errors import ContextOverflow, InputError, ModelError, QvqError
from qvq_local.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    Family,
    family_for_gguf_arch,
    family_for_projector,
    supported_gguf_archs,
)
from qvq_local.fit import gpu_split
from qvq_local.formats.gguf import file_type_name, gguf_sampling_keys, sampling_values

# The text architectures and mmproj projectors this backend runs are the registered families'
# (``qvq_local.families``: family_for_gguf_arch / family_for_projector).

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

    def image_token_estimate(self, width: int, height: int) -> int:
        """Image tokens (KV cells) one ``width`` x ``height`` image takes, after mtmd's resize and merge."""
        gw, gh = image_grid(width, height, self.patch_size, self.merge_size, self.family)
        return gw * gh

    def image_positions(self, width: int, height: int) -> int:
        """Positions one image advances ``n_pos`` by (M-RoPE: ``max(grid_w, grid_h)``)."""
        return max(image_grid(width, height, self.patch_size, self.merge_size, self.family))

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
        self, sampling: SamplingParams | None = None, *, n_ctx: int | None = None, n_seq: int = 1
    ) -> LlamaSession:
        """Open a session (one KV cache) of ``n_ctx`` cells; size it with :meth:`context_needed`.

        ``n_seq`` > 1 makes room for that many chains forked from one prefill (:meth:`LlamaSession.fork`);
        ``n_ctx`` then counts the cells of all of them (the prompt's are shared), so the trained-length
        check is the caller's, per chain.
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
        session = LlamaSession(self, resolved, n_ctx, n_seq=n_seq)
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


def _free_session(llama_cpp: Any, batch: Any, ctx: Any) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)


def _check_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{what} not found", path=path)
    if not path.is_file():
        raise ModelError(f"{what} is not a file", path=path)
    return path


def _read_checked_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The key/values and tensor records of a GGUF file whose tensors all lie inside it, from one pass
    over its header.

    Refuses a file cut short (an interrupted download or copy) with a message that says so and names the
    file; llama.cpp would only say "failed to load model".  Reads the header only, never tensor data.
    """
    from qvq_local.integrity import inspect_gguf

    findings: list = []
    header = inspect_gguf(path, findings)
    if header is None:
        problem = next(f for f in findings if f.level == "error")
        raise ModelError(problem.message, path=problem.path)
    return {"__n_tensors__": header.n_tensors, **header.fields}, header.tensors


#: A GPU buffer llama.cpp could not allocate, in its own log lines (ggml-cuda.cu, llama-model.cpp,
#: ggml-metal, ggml-vulkan): ``cudaMalloc failed: out of memory``, ``unable to allocate CUDA0 buffer``.
_GPU_WORD = re.compile(r"cuda|metal|vulkan|rocm|hip\b|sycl|gpu", re.IGNORECASE)
_ALLOC_FAILED = re.compile(r"alloc|out of memory", re.IGNORECASE)


def load_failure_hint(why: str, gpu_layers: int) -> str | None:
    """What to do when llama.cpp could not allocate GPU memory (``why``: the error lines it logged, e.g.
    ``cudaMalloc failed: out of memory``) with ``gpu_layers`` asked for; None for any other failure
    (a host-memory allocation, a corrupt file) or when nothing was going to the GPU."""
    if gpu_layers == 0 or not (_GPU_WORD.search(why) and _ALLOC_FAILED.search(why)):
        return None
    fewer = "fewer layers with --gpu-layers N" if gpu_layers < 0 else f"fewer than --gpu-layers {gpu_layers}"
    return f"the GPU's memory is too small: put {fewer} there (qvq doctor --model MODEL estimates N)"


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
    # Families may share a text architecture (Qwen2.5-VL's text GGUF is ``qwen2vl`` too): the projector
    # says which family the pair is.
    proj_family = family_for_projector(projector)
    if proj_family is None or proj_family.gguf_text_arch != arch:
        expected = " or ".join(f.gguf_projector for f in FAMILIES.values() if f.gguf_text_arch == arch)
        raise ModelError(f"mmproj projector type is {projector!r}, expected {expected}", path=mmproj_path)
    family = proj_family

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


# ---------------------------------------------------------------- the session


class LlamaSession:
    """One question: a llama.cpp context (KV cache) and a sampler chain (implements ``Session``)."""

    backend = "llama"

    @property
    def n_past(self) -> int:
        """KV cells in use: what ``n_ctx`` limits (the Session protocol's measure of a full context)."""
        return self.n_cells

    def __init__(self, model: LlamaModel, sampling: SamplingParams, n_ctx: int, *, n_seq: int = 1):
        llama_cpp, _ = libs()
        self.n_seq = int(n_seq)  # sequences the KV cache can hold (fork() needs one per chain)
        self.model = model
        self.sampling = sampling
        self.n_ctx = n_ctx
        self.n_pos = 0  # positions used (M-RoPE: an image advances this by max(grid_w, grid_h))
        self.n_cells = 0  # KV cells used (an image fills one per image token)
        self.images_encoded = 0
        self.prefilled = False
        self.prompt_text_ids: list[int] = []  # the prompt's text tokens, image chunks left out (for tests)
        # Set before prefill() to keep each image's encoder output (tokens x n_embd float32) for parity tests.
        self.capture_image_embeddings = False
        self.image_embeddings: list = []
        self.prefix_state: PrefixState | None = None  # set by prefill(keep_prefix=True) when it has images
        self.n_batch = min(512, n_ctx)
        self.text = TokenText(model.vocab())  # token ids -> the text they add

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq
        if self.n_seq > 1:
            cparams.kv_unified = True  # one cell pool: forked chains share the prompt's cells
        cparams.n_threads = model.n_threads
        cparams.n_threads_batch = model.n_threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        LOG.clear()
        ctx = llama_cpp.llama_init_from_model(model._model, cparams)
        if not ctx:
            why = LOG.last_error() or "out of memory?"
            gpu_hint = load_failure_hint(" ".join(LOG.errors), model.gpu_layers if model.gpu_offload else 0)
            raise QvqError(
                f"llama.cpp could not create a context of {n_ctx} tokens: {why}",
                hint="lower the budgets or the image size" + (f"; or {gpu_hint}" if gpu_hint else ""),
            )
        self._ctx = ctx
        self._forked = False
        self.sampler = Sampler(sampling, model.n_vocab)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Frees the handles at close(), or when the session is garbage-collected, or at exit (before the model).
        self._finalizer = weakref.finalize(self, _free_session, llama_cpp, self._batch, ctx)

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("this session was closed")

    def _need_cells(self, n: int, what: str) -> None:
        check_room(self.n_cells, n, self.n_ctx, what)

    # -- decoding

    def decode(self, entries: list[tuple[int, int, int, bool]], on_logits: Any = None) -> int:
        """Decode ``entries`` (sequence, token, position, logits wanted) in batches of ``n_batch``; the
        cells they fill count as this session's.  ``on_logits(i, logits)`` is called right after its batch
        for each entry ``i`` that wanted logits (a float32 view of n_vocab, valid until the next decode).
        Returns the number of ``llama_decode`` calls.  The forked chains decode through this too."""
        import numpy as np

        llama_cpp, _ = libs()
        self._check_open()
        batch, calls = self._batch, 0
        for start in range(0, len(entries), self.n_batch):
            part = entries[start : start + self.n_batch]
            batch.n_tokens = len(part)
            for i, (seq, tok, pos, wanted) in enumerate(part):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if wanted else 0
            rc = llama_cpp.llama_decode(self._ctx, batch)
            LOG.reraise()
            if rc != 0:
                self._decode_failed(rc, len(part))
            calls += 1
            self.n_cells += len(part)
            if on_logits is not None:
                for i, (_seq, _tok, _pos, wanted) in enumerate(part):
                    if wanted:
                        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
                        on_logits(start + i, np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)))
        return calls

    def _decode_tokens(self, tokens: list[int], *, logits_last: bool = True) -> None:
        """Decode ``tokens`` of sequence 0 at positions n_pos..; logits only for the very last one."""
        last = len(tokens) - 1
        self.decode([(0, tok, self.n_pos + i, logits_last and i == last) for i, tok in enumerate(tokens)])
        self.n_pos += len(tokens)

    def _decode_failed(self, rc: int, n: int) -> None:
        why = LOG.last_error()
        if rc == 1:
            raise ContextOverflow(
                f"llama.cpp found no room for {n} token(s) in a context of {self.n_ctx} ({self.n_cells} used)",
                hint="size n_ctx with context_needed() or lower the budgets",
            )
        raise QvqError(f"llama.cpp decode failed with code {rc}" + (f": {why}" if why else ""))

    # -- Session protocol

    def prefill(
        self, prompt: Prompt, *, prefix: PrefixState | None = None, keep_prefix: bool = False
    ) -> PrefillStats:
        """Tokenise the prompt with mtmd, encode each image once, and fill the KV cache.

        ``prefix``: a :class:`PrefixState` of this model for the same system prompt and images: its KV
        cells are restored (``llama_state_seq_set_data``) in place of every chunk up to and including the
        last image, and only the text after it is decoded.  ``keep_prefix``: after the last image chunk,
        copy the sequence's state (``llama_state_seq_get_data``) into ``self.prefix_state``.  Both paths
        decode the text after the last image in the same batches, so their logits are the same.
        """
        import numpy as np

        llama_cpp, mtmd_cpp = libs()
        self._check_open()
        if self.prefilled:
            raise RuntimeError(
                "prefill() was already called on this session; open a new session per question"
            )
        n_images = len(prompt.images)
        block, pad = self.model.family.image_block, self.model.family.image_pad
        n_blocks = prompt.text.count(block)
        if n_blocks != n_images or prompt.text.count(pad) != n_images:
            raise InputError(
                f"the prompt has {prompt.text.count(pad)} image placeholder(s) for {n_images} image(s)"
            )
        mctx = self.model._mtmd
        marker = mtmd_cpp.mtmd_default_marker().decode("utf-8")
        # mtmd adds <|vision_start|>/<|vision_end|> around each image itself: replace the whole block.
        text = prompt.text.replace(block, marker)

        t_start = time.perf_counter()
        bitmaps = []
        chunks = None
        try:
            for img in prompt.images:
                arr = np.ascontiguousarray(np.asarray(self._fit_to_grid(img), dtype=np.uint8))
                h, w = arr.shape[:2]
                ptr = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bmp = mtmd_cpp.mtmd_bitmap_init(w, h, ptr)  # copies the pixels
                if not bmp:
                    raise QvqError(f"mtmd could not take a {w}x{h} image")
                bitmaps.append(bmp)
            data = text.encode("utf-8")
            inp = mtmd_cpp.mtmd_input_text(data, len(data), False, True)
            arr_t = mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, n_images)
            bmp_arr = arr_t(*bitmaps) if bitmaps else arr_t()
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            rc = mtmd_cpp.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), bmp_arr, n_images)
            if rc == 1:
                raise InputError("the number of images does not match the image markers in the prompt")
            if rc != 0:
                raise InputError(
                    f"mtmd could not preprocess the image(s) (code {rc})"
                    + (f": {LOG.last_error()}" if LOG.last_error() else "")
                )
            total = int(mtmd_cpp.mtmd_helper_get_n_tokens(chunks))
            self._need_cells(total, "the prompt")

            n_chunks = int(mtmd_cpp.mtmd_input_chunks_size(chunks))
            kinds = [
                mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                for i in range(n_chunks)
            ]
            # the prefix: every chunk up to and including the last image (none without images)
            n_prefix = max(
                (i + 1 for i, k in enumerate(kinds) if k != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT), default=0
            )
            encode_s = 0.0
            image_tokens: list[int] = []
            text_ids: list[int] = []
            if prefix is not None:
                image_tokens = self._restore_prefix(prefix, chunks, n_prefix, text_ids)
            for i in range(n_chunks):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                ctype = kinds[i]
                last = i == n_chunks - 1
                if prefix is not None and i < n_prefix:
                    continue  # restored above
                if keep_prefix and i == n_prefix and n_prefix:
                    self.prefix_state = self._export_prefix(text_ids, image_tokens)
                if ctype == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    ids = [int(ptr[j]) for j in range(n.value)]
                    text_ids.extend(ids)
                    if ids:
                        self._decode_tokens(ids, logits_last=last)
                elif ctype == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_tok = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
                    t0 = time.perf_counter()
                    rc = mtmd_cpp.mtmd_encode_chunk(mctx, chunk)
                    LOG.reraise()
                    encode_s += time.perf_counter() - t0
                    self.images_encoded += 1
                    if rc != 0:
                        raise QvqError(f"the vision encoder failed (code {rc}): {LOG.last_error()}")
                    embd = mtmd_cpp.mtmd_get_output_embd(mctx)
                    if self.capture_image_embeddings:
                        n_embd = self.model.n_embd
                        self.image_embeddings.append(
                            np.ctypeslib.as_array(embd, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
                        )
                    new_n_past = llama_cpp.llama_pos(0)
                    rc = mtmd_cpp.mtmd_helper_decode_image_chunk(
                        mctx,
                        self._ctx,
                        chunk,
                        embd,
                        self.n_pos,
                        0,
                        self.n_batch,
                        ctypes.byref(new_n_past),
                        mtmd_cpp.mtmd_helper_post_decode_callback(),
                        None,
                    )
                    LOG.reraise()
                    if rc != 0:
                        self._decode_failed(rc, n_tok)
                    self.n_pos = int(new_n_past.value)
                    self.n_cells += n_tok
                    image_tokens.append(n_tok)
                else:
                    raise InputError("the prompt holds a media chunk this backend does not support (audio?)")
            if (
                n_chunks == 0
                or mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, n_chunks - 1))
                != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT
            ):
                raise InputError("the prompt must end with text (the assistant turn's opening)")
        finally:
            if chunks is not None:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bmp in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bmp)
        self.prefilled = True
        self.prompt_text_ids = text_ids
        self.sampler.accept(
            text_ids
        )  # the repetition penalty sees the prompt's text tokens, as in transformers
        return PrefillStats(
            prompt_tokens=self.n_cells,
            image_tokens=sum(image_tokens),
            image_encode_s=encode_s,
            prefill_s=time.perf_counter() - t_start,
            image_tokens_per_image=image_tokens,
        )

    # -- prefix state (registry capability ``prefix_state``)

    def _export_prefix(self, text_ids: list[int], image_tokens: list[int]) -> PrefixState:
        """Copy sequence 0's KV state now (just after the last image chunk)."""
        import numpy as np

        llama_cpp, _ = libs()
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, 0))
        buf = np.empty(size, dtype=np.uint8)
        got = int(
            llama_cpp.llama_state_seq_get_data(
                self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
            )
        )
        if got != size:
            raise QvqError(f"llama.cpp saved {got} of {size} bytes of the prefix state")
        return PrefixState(
            backend=self.backend,
            n_cells=self.n_cells,
            n_pos=self.n_pos,
            ids=list(text_ids),
            tensors={"seq_state": buf},
            meta={"image_tokens": list(image_tokens)},
        )

    def _restore_prefix(
        self, state: PrefixState, chunks: Any, n_prefix: int, text_ids: list[int]
    ) -> list[int]:
        """Check ``state`` against this prompt's first ``n_prefix`` chunks and load its KV cells.

        Fills ``text_ids`` with the prefix's text tokens; returns its image token counts.  A state that
        does not fit this prompt (other text, other image sizes, another backend) raises ``InputError``.
        """
        import numpy as np

        llama_cpp, mtmd_cpp = libs()
        image_tokens: list[int] = []
        for i in range(n_prefix):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                text_ids.extend(int(ptr[j]) for j in range(n.value))
            else:
                image_tokens.append(int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)))
        if (
            state.backend != self.backend
            or not n_prefix
            or list(state.ids) != text_ids
            or list(state.meta.get("image_tokens", [])) != image_tokens
            or state.n_cells != len(text_ids) + sum(image_tokens)
        ):
            raise InputError("the saved prefix state does not match this prompt (other text or images)")
        self._need_cells(state.n_cells, "the saved prefix")
        blob = np.ascontiguousarray(state.tensors["seq_state"], dtype=np.uint8)
        read = int(
            llama_cpp.llama_state_seq_set_data(
                self._ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), blob.size, 0
            )
        )
        if read != blob.size:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, -1, -1)
            raise InputError(f"llama.cpp refused the saved prefix state (read {read} of {blob.size} bytes)")
        self.n_pos, self.n_cells = int(state.n_pos), int(state.n_cells)
        return image_tokens

    def _fit_to_grid(self, img: Any) -> Any:
        """Resize (stretch, PIL bicubic) to the patch-aligned size transformers' Qwen2-VL processor uses.

        mtmd would letterbox instead (keep the aspect ratio, pad black), which changes what the model sees
        for any image whose sides are not multiples of 28; an aligned image passes through mtmd unchanged.
        """
        from PIL import Image

        rgb = img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img
        w, h = rgb.size
        if w == 0 or h == 0:
            raise InputError("an image is empty (0 pixels)")
        align = self.model.patch_size * self.model.merge_size
        gw, gh = image_grid(w, h, self.model.patch_size, self.model.merge_size, self.model.family)
        if (w, h) != (gw * align, gh * align):
            rgb = rgb.resize((gw * align, gh * align), Image.Resampling.BICUBIC)
        return rgb

    def step(self, banned: TokenMask | None = None) -> Token:
        """Sample the next token from the current logits (never one of ``banned``), decode it into the
        cache, return its text."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before step()")
        self.sampler.use_mask(banned)
        tok = self.sampler.sample(self._ctx)
        if self.text.is_end(tok):
            # Not decoded: nothing follows an end of turn unless the caller feeds text, which decodes itself.
            return Token(id=tok, text=self.text.end(), is_eos=True)
        self._need_cells(1, "the next token")
        self._decode_tokens([tok])
        return Token(id=tok, text=self.text.push(tok), is_eos=False)

    def feed(self, text: str) -> int:
        """Append ``text`` (no BOS, no special-token parsing) to the cache; the image is not touched."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before feed()")
        tokens = self.model.tokenize(text, special=False)
        if not tokens:
            return 0
        self._need_cells(len(tokens), "the forced text")
        self.text.reset()  # a half character left by step() is superseded by the forced text
        self._decode_tokens(tokens)
        self.sampler.accept(tokens)
        return len(tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text, special=False))

    def last_logits(self):
        """The logits the next step() samples from, as a float32 numpy array of n_vocab (a copy)."""
        import numpy as np

        llama_cpp, _ = libs()
        self._check_open()
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise RuntimeError("no logits yet: call prefill() first")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).astype(np.float32, copy=True)

    def fork(self, n: int) -> list:
        """After prefill: ``n`` chains sharing the prompt's KV cells, decoded together in one batch
        (:mod:`qvq_local.backends.llama_chains`; the registry's ``chains`` capability).  The session must
        have been opened with ``n_seq >= n``; the prompt's cells of sequence 0 are shared with sequences
        1..n-1 (``llama_memory_seq_cp``: the cache is unified, so a copy adds a sequence id to the same
        cells), and each chain starts from a copy of the prompt's last logits."""
        llama_cpp, _ = libs()
        self._check_open()
        if not self.prefilled:
            raise RuntimeError("call prefill() before fork()")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"the number of chains must be a positive whole number, got {n!r}")
        if n > self.n_seq:
            raise InputError(f"this session was opened for {self.n_seq} chain(s), not {n}")
        if self._forked:
            raise RuntimeError("fork() was already called on this session")
        self._forked = True
        mem = llama_cpp.llama_get_memory(self._ctx)
        for seq in range(1, n):
            llama_cpp.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        return llama_chains.start_chains(self, n, self.last_logits())

    def close(self) -> None:
        """Free the sampler, batch and context (idempotent)."""
        if self._ctx is None:
            return
        self._ctx = None
        self.sampler.close()
        self._finalizer()
