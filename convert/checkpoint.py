"""Open and validate a Hugging Face Qwen2-VL checkpoint folder, before anything is converted.

Every converter (GGUF, MLX) calls :func:`open_checkpoint` first, so every problem a user can have with a
source folder surfaces as one ``ModelError`` naming the file, *before* any output exists: wrong
architecture, pickle-only weights (never loaded), missing or truncated shards, tensors that do not match
the config.  The returned :class:`Checkpoint` reads tensors lazily (memory-mapped; bf16 kept as raw bits
until a caller asks for float32), so opening a 146 GB checkpoint costs only its headers.

Two tensor namings exist for the same weights: the original Qwen2-VL one (``model.layers.*``,
``visual.*``, ``lm_head``), which QVQ-72B-Preview ships, and transformers 5's (``model.language_model.*``,
``model.visual.*``, ``lm_head``).  A :class:`Checkpoint` always speaks the original naming; it remembers
which stored name each tensor came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.errors import ModelError

SUPPORTED_ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F32", "F16", "BF16")

# Files a converter may need besides the weights, in the order they are looked for.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
OTHER_FILE_NAMES = ("preprocessor_config.json", "generation_config.json")

# transformers 5 prefix -> original prefix (first match wins; longer prefixes first).
_RENAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)


def normalise_name(name: str) -> str:
    """Map a stored tensor name (either naming) to the original Qwen2-VL name."""
    for new, old in _RENAMES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


@dataclass(frozen=True)
class TextDims:
    """The language model's shape, from config.json (checked against the tensors)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's token count)
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's shape (a ViT plus the 2x2 patch merger that projects into the text width)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    out_hidden_size: int
    hidden_act: str
    layer_norm_eps: float = 1e-6

    @property
    def merged_dim(self) -> int:
        """Width of the merger's input: embed_dim times the merged patch count."""
        return self.embed_dim * self.spatial_merge_size**2


@dataclass
class Checkpoint:
    """A validated Qwen2-VL checkpoint.  Tensor access uses the original names (see module doc)."""

    folder: Path
    config: dict[str, Any]
    text: TextDims
    vision: VisionDims
    naming: str  # "original" or "transformers5"
    files: dict[str, Path]  # tokenizer/preprocessor/generation files present, by file name
    _store: Any = field(repr=False)  # ShardedCheckpoint
    _stored_names: dict[str, str] = field(repr=False)  # original name -> name in the files

    # ---- names and shapes
    @property
    def names(self) -> list[str]:
        """All tensor names, original naming, in a stable order (text first, then vision)."""
        return list(self._stored_names)

    def __contains__(self, name: object) -> bool:
        return name in self._stored_names

    def stored_name(self, name: str) -> str:
        """The name under which ``name`` is stored in the safetensors files."""
        try:
            return self._stored_names[name]
        except KeyError:
            raise ModelError(f"no tensor named {name!r}", path=self.folder) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._store.shape(self.stored_name(name)))

    def dtype(self, name: str) -> str:
        """safetensors dtype string: F32, F16 or BF16."""
        return self._store.dtype(self.stored_name(name))

    def nbytes(self, name: str) -> int:
        return self._store.nbytes(self.stored_name(name))

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data across all shards."""
        return sum(self.nbytes(n) for n in self._stored_names)

    @property
    def shards(self) -> list[Path]:
        return list(self._store.shards)

    @property
    def preprocessor_config(self) -> dict[str, Any]:
        path = self.files.get("preprocessor_config.json")
        return _read_json(path) if path else {}

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        path = self.files.get("tokenizer_config.json")
        return _read_json(path) if path else {}

    # ---- data
    def read_raw(self, name: str):
        """Memory-mapped, read-only view in the storage dtype (BF16 as uint16 bits); no copy."""
        return self._store.raw(self.stored_name(name))

    def read_f32(self, name: str):
        """A float32 copy of the whole tensor (bf16 widened exactly).  For small tensors."""
        return self._store.to_f32(self.stored_name(name))

    def iter_rows_f32(
        self, name: str, start: int = 0, stop: int | None = None, max_chunk_bytes: int = 64 * 1024 * 1024
    ) -> Iterator[Any]:
        """Yield float32 copies of consecutive row blocks ``[start:stop]`` along axis 0.

        Each block holds at most ``max_chunk_bytes`` of float32 (at least one row), so converting a
        tensor of any size needs only that much memory.
        """
        raw = self.read_raw(name)
        stop = raw.shape[0] if stop is None else stop
        row_elems = math.prod(raw.shape[1:]) if raw.ndim > 1 else 1
        step = max(1, max_chunk_bytes // max(1, row_elems * 4))
        for a in range(start, stop, step):
            yield to_f32(raw[a : min(stop, a + step)], self.dtype(name))

    def release(self) -> None:
        """Drop the memory maps (they are re-created on the next read), so resident memory stays small."""
        self._store.close()

    close = release


def to_f32(raw, dtype: str):
    """float32 copy of a raw block in safetensors ``dtype`` (BF16 given as uint16 bits)."""
    import numpy as np
    from qvq_local.convert.safetensors_io import bf16_bits_to_f32

    if dtype == "BF16":
        return bf16_bits_to_f32(np.asarray(raw))
    return np.array(raw, dtype=np.float32, copy=True)


# ------------------------------------------------------------------------------------------ opening
def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Validate ``folder`` as a Qwen2-VL safetensors checkpoint and open it lazily.

    Checks, in order: config.json and the architecture; weight files (pickle-only folders are refused,
    never opened); every shard present and complete; tokenizer present; the tensor set and every
    tensor's shape and dtype against the config.  Raises ``ModelError`` naming the file on the first
    problem.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ModelError("no such folder", path=folder)
    if not folder.is_dir():
        raise ModelError("is not a folder (expected a Hugging Face checkpoint folder)", path=folder)

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError("no config.json: not a Hugging Face checkpoint folder", path=folder)
    config = _read_json(config_path)
    _check_architecture(config, config_path)
    text, vision = _dims_from_config(config, config_path)

    _check_weight_files(folder)
    from qvq_local.convert.safetensors_io import ShardedCheckpoint

    store = ShardedCheckpoint(folder)  # checks the index, shard presence, headers vs file sizes

    files = {n: folder / n for n in TOKENIZER_FILE_NAMES + OTHER_FILE_NAMES if (folder / n).is_file()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files.keys():
        raise ModelError("no tokenizer.json (or vocab.json + merges.txt)", path=folder)

    stored = _normalised_names(store, folder)
    naming = "transformers5" if any(n != s for n, s in stored.items()) else "original"
    ckpt = Checkpoint(
        folder=folder,
        config=config,
        text=text,
        vision=vision,
        naming=naming,
        files=files,
        _store=store,
        _stored_names=stored,
    )
    _check_tensors(ckpt)
    return ckpt


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read JSON ({err})", path=path) from None
    if not isinstance(data, dict):
        raise ModelError("is not a JSON object", path=path)
    return data


def _check_architecture(config: dict[str, Any], path: Path) -> None:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if any(a in SUPPORTED_ARCHITECTURES for a in archs) or (
        not archs and model_type in SUPPORTED_MODEL_TYPES
    ):
        return
    found = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
    raise ModelError(
        f"unsupported architecture {found}",
        path=path,
        hint=f"qvq-local converts {', '.join(SUPPORTED_ARCHITECTURES)} (QVQ / Qwen2-VL) checkpoints",
    )


def _need(cfg: dict[str, Any], key: str, path: Path, kind: type = int) -> Any:
    value = cfg.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"missing or non-numeric {key!r}", path=path)
    if kind is int:
        if int(value) != value or value <= 0:
            raise ModelError(f"{key!r} must be a positive integer, got {value!r}", path=path)
        return int(value)
    return float(value)


def _dims_from_config(config: dict[str, Any], path: Path) -> tuple[TextDims, VisionDims]:
    """Read the text and vision shapes (flat Qwen2-VL config or transformers 5's ``text_config``)."""
    tc = {**config, **(config.get("text_config") or {})}
    hidden = _need(tc, "hidden_size", path)
    heads = _need(tc, "num_attention_heads", path)
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise ModelError(
            f"hidden_size {hidden} / heads {heads} / kv heads {kv_heads} do not divide", path=path
        )
    head_dim = hidden // heads
    rope = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    section = tuple(int(x) for x in (rope.get("mrope_section") or ()))
    if not section:
        raise ModelError("no rope_scaling.mrope_section (Qwen2-VL uses multimodal RoPE)", path=path)
    if sum(section) * 2 != head_dim or len(section) > 4:
        raise ModelError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}", path=path)
    rope_theta = float(tc.get("rope_theta") or rope.get("rope_theta") or 1_000_000.0)
    text = TextDims(
        hidden_size=hidden,
        num_layers=_need(tc, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_need(tc, "intermediate_size", path),
        vocab_size=_need(tc, "vocab_size", path),
        rms_norm_eps=float(tc.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta,
        mrope_section=section,
        max_position_embeddings=int(tc.get("max_position_embeddings") or 32768),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
    )
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        raise ModelError("no vision_config", path=path)
    vpath = Path(f"{path} (vision_config)")
    embed = _need(vc, "embed_dim", vpath)
    ratio = float(vc.get("mlp_ratio", 4))
    vision = VisionDims(
        embed_dim=embed,
        depth=_need(vc, "depth", vpath),
        num_heads=_need(vc, "num_heads", vpath),
        mlp_dim=int(embed * ratio),
        patch_size=int(vc.get("patch_size", 14)),
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        in_channels=int(vc.get("in_chans", vc.get("in_channels", 3))),
        spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
        out_hidden_size=int(vc.get("hidden_size", hidden)),
        hidden_act=str(vc.get("hidden_act", "quick_gelu")),
    )
    if vision.out_hidden_size != hidden:
        raise ModelError(
            f"vision_config.hidden_size {vision.out_hidden_size} (merger output) must equal the "
            f"text hidden_size {hidden}",
            path=path,
        )
    if embed % vision.num_heads:
        raise ModelError(
            f"vision embed_dim {embed} is not divisible by num_heads {vision.num_heads}", path=path
        )
    return text, vision


def _check_weight_files(folder: Path) -> None:
    """Refuse folders whose weights are only pickles (never opened) or absent."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(
            f"only pickle weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}), "
            "which qvq-local never loads",
            path=folder / pickles[0],
            hint="use a safetensors checkpoint",
        )
    raise ModelError(
        "no safetensors weights (model.safetensors or model.safetensors.index.json)", path=folder
    )


def _normalised_names(store: Any, folder: Path) -> dict[str, str]:
    stored: dict[str, str] = {}
    for name in store:
        norm = normalise_name(name)
        if norm in stored:
            raise ModelError(
                f"tensor {norm!r} is stored twice (as {stored[norm]!r} and {name!r})",
                path=store.shard_of(name),
            )
        stored[norm] = name
    return dict(sorted(stored.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(name: str) -> tuple:
    """Text tensors first, then vision; blocks in numeric order."""
    parts = name.split(".")
    return (name.startswith("visual."), [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


# ------------------------------------------------------------------------------------------ shape checks
def expected_shapes(text: TextDims, vision: VisionDims) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2-VL checkpoint with these dims holds (original names), with its shape."""
    h, q, kv, f = (
        text.hidden_size,
        text.num_heads * text.head_dim,
        text.num_kv_heads * text.head_dim,
        text.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (text.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not text.tie_word_embeddings:
        shapes["lm_head.weight"] = (text.vocab_size, h)
    for i in range(text.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    e, m, md = vision.embed_dim, vision.mlp_dim, vision.merged_dim
    shapes["visual.patch_embed.proj.weight"] = (
        e,
        vision.in_channels,
        vision.temporal_patch_size,
        vision.patch_size,
        vision.patch_size,
    )
    for i in range(vision.depth):
        p = f"visual.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (e,),
                p + "norm1.bias": (e,),
                p + "norm2.weight": (e,),
                p + "norm2.bias": (e,),
                p + "attn.qkv.weight": (3 * e, e),
                p + "attn.qkv.bias": (3 * e,),
                p + "attn.proj.weight": (e, e),
                p + "attn.proj.bias": (e,),
                p + "mlp.fc1.weight": (m, e),
                p + "mlp.fc1.bias": (m,),
                p + "mlp.fc2.weight": (e, m),
                p + "mlp.fc2.bias": (e,),
            }
        )
    shapes.update(
        {
            "visual.merger.ln_q.weight": (e,),
            "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (md, md),
            "visual.merger.mlp.0.bias": (md,),
            "visual.merger.mlp.2.weight": (vision.out_hidden_size, md),
            "visual.merger.mlp.2.bias": (vision.out_hidden_size,),
        }
    )
    return shapes


def _check_tensors(ckpt: Checkpoint) -> None:
    want = expected_shapes(ckpt.text, ckpt.vision)
    have = ckpt._stored_names
    # A tied checkpoint may still carry lm_head; accept it if its shape is right.
    if ckpt.text.tie_word_embeddings and "lm_head.weight" in have:
        want["lm_head.weight"] = (ckpt.text.vocab_size, ckpt.text.hidden_size)
    missing = [n for n in want if n not in have]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(
            f"tensor {missing[0]!r}{more} missing for the config's dimensions",
            path=ckpt.folder,
            hint="a shard may be missing or config.json may not match the weights",
        )
    for name, stored_name in have.items():
        shard = ckpt._store.shard_of(stored_name)
        if name not in want:
            raise ModelError(f"unexpected tensor {stored_name!r} (not part of Qwen2-VL)", path=shard)
        got = ckpt.shape(name)
        if got != want[name]:
            raise ModelError(
                f"tensor {stored_name!r} has shape {list(got)} but config.json implies {list(want[name])}",
                path=shard,
            )
        dtype = ckpt.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"tensor {stored_name!r} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}",
                path=shard,
            )
