"""The text half of a GGUF pair, every family's part of it: the vocabulary, the key/values, the tensors.

A family's converter class (``convert/gguf_converter.py``) builds on these: the generic key/values
(:func:`add_text_keys`), the tensors it names in GGUF order with their types (:func:`plan_text_tensors`).
llama.cpp's Qwen-VL text models need no transpose or permutation of a tensor, only renaming.  The
tokenizer is byte-level BPE (``gpt2`` in GGUF terms) with the family's pre-tokenizer; its token list must
have exactly as many entries as the embedding has rows, so ids the tokenizer does not use are filled
with ``UNUSED`` placeholders.  Everything here is read from the checkpoint's own files (no
transformers), and everything that can be wrong is checked before the caller writes a byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvq_local.convert.checkpoint import Checkpoint
from qvq_local.convert.gguf_stream import PlannedTensor, iter_encoded

from qvq_local.errors import ModelError
from qvq_local.formats.gguf import gguf_sampling_keys, sampling_values


# ------------------------------------------------------------------------------------------ vocabulary
@dataclass
class Vocab:
    """What GGUF's tokenizer keys need, read from the checkpoint's tokenizer files."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    n_real: int  # tokens the tokenizer defines (the rest are UNUSED padding)
    specials: dict[str, int] = field(default_factory=dict)


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_vocab(ckpt: Checkpoint) -> Vocab:
    """Build the GGUF vocabulary, padded with UNUSED entries up to the embedding's row count."""
    from gguf import TokenType

    files = ckpt.files
    vocab: dict[str, int]
    added: list[tuple[int, str, bool]] = []  # (id, text, special)
    if "tokenizer.json" in files:
        path = files["tokenizer.json"]
        data = _load_json(path)
        model = data.get("model") or {}
        if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
            raise ModelError(f"tokenizer model {model.get('type')!r} is not byte-level BPE", path=path)
        vocab = model["vocab"]
        raw_merges = model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
        for entry in data.get("added_tokens") or []:
            added.append((int(entry["id"]), str(entry["content"]), bool(entry.get("special", False))))
    else:
        path = files["vocab.json"]
        vocab = _load_json(path)
        lines = files["merges.txt"].read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        decoder = ckpt.tokenizer_config.get("added_tokens_decoder") or {}
        for key, entry in decoder.items():
            added.append((int(key), str(entry["content"]), bool(entry.get("special", False))))

    rows = ckpt.text.vocab_size
    tokens: list[str | None] = [None] * rows
    types = [int(TokenType.UNUSED)] * rows

    def place(idx: int, text: str, ttype: int) -> None:
        if not 0 <= idx < rows:
            raise ModelError(f"token {text!r} has id {idx} but the embedding has only {rows} rows", path=path)
        tokens[idx] = text
        types[idx] = ttype

    for text, idx in vocab.items():
        place(int(idx), text, int(TokenType.NORMAL))
    specials: dict[str, int] = {}
    for idx, text, special in added:
        control = special or _looks_special(text)
        place(idx, text, int(TokenType.CONTROL if control else TokenType.USER_DEFINED))
        specials[text] = idx
    n_real = sum(t is not None for t in tokens)
    if n_real == 0:
        raise ModelError("tokenizer defines no tokens", path=path)
    filled = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]

    ids = {t: i for i, t in enumerate(tokens) if t is not None}
    tok_cfg = ckpt.tokenizer_config

    def special_id(key: str) -> int | None:
        text = _token_text(tok_cfg.get(f"{key}_token"))
        if text is not None and text in ids:
            return ids[text]
        value = ckpt.config.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if isinstance(value, int) and 0 <= value < rows else None

    return Vocab(
        tokens=filled,
        token_types=types,
        merges=merges,
        bos_id=special_id("bos"),
        eos_id=special_id("eos"),
        pad_id=special_id("pad"),
        chat_template=read_chat_template(ckpt),
        n_real=n_real,
        specials=specials,
    )


def read_chat_template(ckpt: Checkpoint) -> str | None:
    """The chat template: tokenizer_config.json's, else chat_template.jinja, else chat_template.json."""
    tmpl = ckpt.tokenizer_config.get("chat_template")
    if isinstance(tmpl, list):  # named templates: take "default", else the first
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    if "chat_template.jinja" in ckpt.files:
        return ckpt.files["chat_template.jinja"].read_text(encoding="utf-8")
    if "chat_template.json" in ckpt.files:
        tmpl = _load_json(ckpt.files["chat_template.json"]).get("chat_template")
        if isinstance(tmpl, str) and tmpl:
            return tmpl
    return None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read JSON ({err})", path=path) from None


# ------------------------------------------------------------------------------------------ metadata
def add_text_keys(w: Any, ckpt: Checkpoint, vocab: Vocab, file_type: int, name: str) -> None:
    """Add the key/values every family's text GGUF has to the GGUFWriter ``w``."""
    from gguf import GGML_QUANT_VERSION

    t = ckpt.text
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_layers)
    if t.intermediate_size:  # a model whose every layer is a mixture of experts has no dense width
        w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_rope_freq_base(t.rope_theta)
    w.add_rope_dimension_sections(list(t.mrope_section) + [0] * (4 - len(t.mrope_section)))
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(ckpt.family.gguf_tokenizer_pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    # sampling defaults, where llama.cpp's own converter puts them (llama-cli/-server read them too)
    sampling_keys = gguf_sampling_keys()
    for key, value in generation_sampling(ckpt).items():
        if key == "top_k":
            w.add_int32(sampling_keys[key], int(value))
        else:
            w.add_float32(sampling_keys[key], float(value))


def generation_sampling(ckpt: Checkpoint) -> dict:
    """The sampling values of the checkpoint's generation_config.json ({} when it has none)."""
    path = ckpt.files.get("generation_config.json")
    return sampling_values(_load_json(path)) if path is not None else {}


# ------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class TextSource:
    """Where a text GGUF tensor's data comes from when it is not a checkpoint tensor copied as it is.

    ``name``: the checkpoint tensor; ``parts``: several checkpoint tensors stacked along a new first axis
    instead (experts stored one by one; ``name`` is then the first, ``shape`` is needed); ``rows``:
    ``(start, stop)`` row ranges of it along axis 0, read in this order (a permutation of row blocks;
    None: all rows); ``select``: applied to every row block read
    (a reshape, a slice, a transpose: it must keep the block's rows apart, and work on the raw bits of a
    BF16 block as on float32, unless ``arithmetic``); ``shape``: the tensor's shape once selected (None:
    the checkpoint's); ``arithmetic``: ``select`` computes with the values (``-exp(x)``, ``x + 1``), so the
    tensor is read as float32, never copied as raw BF16 bits.
    """

    name: str
    parts: tuple[str, ...] = ()
    rows: tuple[tuple[int, int], ...] | None = None
    select: Callable[[Any], Any] | None = None
    shape: tuple[int, ...] | None = None
    arithmetic: bool = False


def plan_text_tensors(
    ckpt: Checkpoint,
    names: list[tuple[str | TextSource, str]],
    weight_type: str,
    keep_f32: Callable[[str], bool] | None = None,
) -> list[PlannedTensor]:
    """The text tensors ``names`` lists (``(checkpoint name or TextSource, GGUF name)``, in GGUF order).
    ``weight_type`` is the type of 2-D (and 3-D) weights: ``F32``, ``F16``, or ``source`` (keep the
    checkpoint's precision: BF16 stays raw BF16, F16 stays F16, F32 stays F32; a tensor computed from its
    values is F32).  Norms, biases and every tensor ``keep_f32(gguf_name)`` names are always F32."""
    plan: list[PlannedTensor] = []
    for src, gname in names:
        source = src if isinstance(src, TextSource) else TextSource(src)
        shape = source.shape or ckpt.shape(source.name)
        if len(shape) == 1 or (keep_f32 is not None and keep_f32(gname)):
            qtype = "F32"
        elif weight_type == "source":
            stored = ckpt.dtype(source.name)
            qtype = "F32" if source.arithmetic else {"BF16": "BF16", "F16": "F16", "F32": "F32"}[stored]
        else:
            qtype = weight_type
        plan.append(PlannedTensor(gname, tuple(shape), qtype, _source(ckpt, source, qtype)))
    return plan


def _source(ckpt: Checkpoint, source: TextSource, qtype: str) -> Callable[[], Any]:
    if source.parts:

        def stacked() -> Iterator[Any]:
            for part in source.parts:
                yield from iter_encoded(ckpt, part, qtype, select=source.select)

        return stacked
    if source.rows is None:
        return lambda: iter_encoded(ckpt, source.name, qtype, select=source.select)

    def chunks() -> Iterator[Any]:
        for start, stop in source.rows:
            yield from iter_encoded(ckpt, source.name, qtype, start, stop, source.select)

    return chunks
