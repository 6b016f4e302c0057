"""Qwen3.5's GGUF pair: llama.cpp's ``qwen35`` / ``qwen35moe`` text model and Qwen3-VL's ``qwen3vl_merger``
mmproj (no DeepStack layer).

After llama.cpp's own converter (``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel`` and the classes they extend,
``Qwen3NextModel`` and ``Qwen2MoeModel``, in ``conversion/qwen.py`` of the llama-cpp-python 0.3.36 sdist):

* the zero-centred RMSNorm weights are written as ``1 + weight`` (llama.cpp's RMSNorm multiplies by the
  weight); the DeltaNet's gated norm (``ssm_norm``) as it is;
* a linear-attention layer: ``in_proj_qkv`` -> ``attn_qkv``, ``in_proj_z`` -> ``attn_gate``, ``in_proj_b`` ->
  ``ssm_beta``, ``in_proj_a`` -> ``ssm_alpha``, ``conv1d`` ``[channels, 1, kernel]`` -> ``ssm_conv1d``
  ``[channels, kernel]`` (F32), ``dt_bias`` -> ``ssm_dt.bias``, ``A_log`` -> ``ssm_a`` = ``-exp(A_log)``,
  ``out_proj`` -> ``ssm_out``.  With fewer key heads than value heads the value heads are reordered from
  grouped by key head (``[k0: v0 v1][k1: v0 v1]``) to tiled (``[k0 v0, k1 v0, k0 v1, k1 v1]``), which ggml's
  broadcasting expects: the V rows of ``attn_qkv`` and of the convolution, ``attn_gate``'s rows, ``ssm_beta``
  and ``ssm_alpha``'s rows, ``ssm_dt`` and ``ssm_a``, and ``ssm_out``'s columns;
* a full-attention layer keeps its double-height ``attn_q`` (query and output gate) and its q/k norms;
* the MoE: the router ``ffn_gate_inp`` (F32), ``ffn_gate_exps`` / ``ffn_up_exps`` ``[experts, width, hidden]``
  (the two halves of ``gate_up_proj``, which is already in llama.cpp's order), ``ffn_down_exps``, the
  shared expert ``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp`` (F32);
* keys: llama.cpp's DeltaNet sizes (``ssm.conv_kernel``, ``ssm.state_size`` = key head size,
  ``ssm.group_count`` = key heads, ``ssm.time_step_rank`` = value heads, ``ssm.inner_size`` = value
  width), ``attention.recurrent_layers``, ``full_attention_interval``, ``rope.dimension_count`` (the
  rotated part of a head) and, for the MoE, the experts' counts and widths;
* the multi-token-prediction block (``mtp.*``) is left out, as llama.cpp's converter does with ``--no-mtp``:
  qvq-local does not draft with it, and the file is smaller.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qvq_local.convert.gguf_converter import register
from qvq_local.convert.gguf_qwen3vl import Qwen3VLConverter
from qvq_local.convert.gguf_text import TextSource, Vocab

from qvq_local.families import qwen3_5
from qvq_local.families.qwen3_5 import HybridTextDims

#: llama.cpp's key listing which layers are recurrent (gguf-py's ``Keys.Attention.RECURRENT_LAYERS``; the
#: gguf package this project pins may predate it).
RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"

#: Layer tensors llama.cpp's converter keeps in F32 whatever the file type.
_F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def tiled_heads(k_heads: int, v_heads: int) -> list[int]:
    """The value heads in llama.cpp's tiled order: output head ``r * k_heads + g`` is the checkpoint's head
    ``g * (v_heads / k_heads) + r`` (grouped by key head ``g``)."""
    per_k = v_heads // k_heads
    return [g * per_k + r for r in range(per_k) for g in range(k_heads)]


def _plus_one(block: Any) -> Any:
    return block + 1  # float32 stays float32


def _neg_exp(block: Any) -> Any:
    import numpy as np

    return (-np.exp(block.astype(np.float64))).astype(np.float32)  # rounded once, as torch's float32 exp is


def _columns(cols: Any):
    """Row-block select of the columns ``cols``, in that order."""
    return lambda block: block[:, cols]


@register(qwen3_5.FAMILY.name, qwen3_5.MOE_FAMILY.name)
class Qwen35Converter(Qwen3VLConverter):
    """Qwen3.5 dense and MoE: the hybrid text model; Qwen3-VL's vision tower without DeepStack."""

    #: llama.cpp's ``qwen35`` does not read a DeepStack layer count.
    deepstack_key: ClassVar[bool] = False

    # ---- the text model
    @property
    def text(self) -> HybridTextDims:
        return self.ckpt.text

    def _v_rows(self, head_dim: int, offset: int = 0) -> tuple[tuple[int, int], ...] | None:
        """Row ranges of the value heads (``head_dim`` rows each, from ``offset``) in tiled order; None when
        key and value heads are as many (nothing to reorder)."""
        t = self.text
        if t.linear_num_key_heads == t.linear_num_value_heads:
            return None
        order = tiled_heads(t.linear_num_key_heads, t.linear_num_value_heads)
        return tuple((offset + h * head_dim, offset + (h + 1) * head_dim) for h in order)

    def text_tensor_names(self) -> list[tuple[str | TextSource, str]]:
        """The embedding, the layers, the final norm (``1 + weight``) and the head; no MTP block."""
        pairs = super().text_tensor_names()
        p = self.family.text_prefix
        return [
            (TextSource(p + "norm.weight", select=_plus_one, arithmetic=True), g) if g == "output_norm.weight" else (s, g)
            for s, g in pairs
        ]  # fmt: skip

    def text_layer_tensors(self, layer: int) -> list[tuple[str | TextSource, str]]:
        """The norms, the token mixer of the layer's kind, then the MLP."""
        p, b = f"{self.family.text_prefix}layers.{layer}.", f"blk.{layer}."
        norm = lambda name: TextSource(p + name, select=_plus_one, arithmetic=True)  # noqa: E731
        out: list[tuple[str | TextSource, str]] = [(norm("input_layernorm.weight"), b + "attn_norm.weight")]
        out += self.linear_tensors(p, b) if self.text.is_linear(layer) else self.attention_tensors(p, b)
        out.append((norm("post_attention_layernorm.weight"), b + "post_attention_norm.weight"))
        return out + self.mlp_tensors(p, b)

    def attention_tensors(self, p: str, b: str) -> list[tuple[str | TextSource, str]]:
        """A full-attention layer: the double-height query, key, value, output, the q/k norms (+1)."""
        a = p + "self_attn."
        return [
            (a + "q_proj.weight", b + "attn_q.weight"),
            (a + "k_proj.weight", b + "attn_k.weight"),
            (a + "v_proj.weight", b + "attn_v.weight"),
            (a + "o_proj.weight", b + "attn_output.weight"),
            (TextSource(a + "q_norm.weight", select=_plus_one, arithmetic=True), b + "attn_q_norm.weight"),
            (TextSource(a + "k_norm.weight", select=_plus_one, arithmetic=True), b + "attn_k_norm.weight"),
        ]

    def linear_tensors(self, p: str, b: str) -> list[tuple[str | TextSource, str]]:
        """A Gated DeltaNet layer, renamed and computed as llama.cpp reads it, value heads tiled."""
        t, a = self.text, p + "linear_attn."
        hv, kd, ch, k = t.linear_value_head_dim, t.linear_key_dim, t.conv_channels, t.linear_conv_kernel
        v_rows = self._v_rows(hv, 2 * kd)
        qkv_rows = None if v_rows is None else ((0, 2 * kd),) + v_rows
        heads = self._v_rows(1)
        out_cols = None
        if heads is not None:
            import numpy as np

            out_cols = _columns(np.concatenate([np.arange(h * hv, (h + 1) * hv) for h, _ in heads]))
        return [
            (TextSource(a + "in_proj_qkv.weight", rows=qkv_rows), b + "attn_qkv.weight"),
            (TextSource(a + "in_proj_z.weight", rows=self._v_rows(hv)), b + "attn_gate.weight"),
            (TextSource(a + "in_proj_b.weight", rows=heads), b + "ssm_beta.weight"),
            (TextSource(a + "in_proj_a.weight", rows=heads), b + "ssm_alpha.weight"),
            (
                TextSource(a + "conv1d.weight", rows=qkv_rows, select=lambda x: x.reshape(len(x), k), shape=(ch, k)),
                b + "ssm_conv1d.weight",
            ),
            (TextSource(a + "dt_bias", rows=heads), b + "ssm_dt.bias"),
            (TextSource(a + "A_log", rows=heads, select=_neg_exp, arithmetic=True), b + "ssm_a"),
            (a + "norm.weight", b + "ssm_norm.weight"),
            (TextSource(a + "out_proj.weight", select=out_cols), b + "ssm_out.weight"),
        ]  # fmt: skip

    def mlp_tensors(self, p: str, b: str) -> list[tuple[str | TextSource, str]]:
        """The dense MLP, or the router, the experts and the gated shared expert."""
        t, m = self.text, p + "mlp."
        if not t.num_experts:
            return [
                (m + "gate_proj.weight", b + "ffn_gate.weight"),
                (m + "up_proj.weight", b + "ffn_up.weight"),
                (m + "down_proj.weight", b + "ffn_down.weight"),
            ]
        e, f, h = t.num_experts, t.moe_intermediate_size, t.hidden_size
        if self.family.experts_apart(self.ckpt, p):  # transformers 5's save_pretrained: stack them

            def each(w: str) -> TextSource:
                first = f"{m}experts.0.{w}.weight"
                names = tuple(f"{m}experts.{k}.{w}.weight" for k in range(e))
                return TextSource(first, parts=names, shape=(e, *self.ckpt.shape(first)))

            experts = [
                (each("gate_proj"), b + "ffn_gate_exps.weight"),
                (each("up_proj"), b + "ffn_up_exps.weight"),
                (each("down_proj"), b + "ffn_down_exps.weight"),
            ]
        else:
            experts = [
                (
                    TextSource(m + "experts.gate_up_proj", select=lambda x: x[:, :f], shape=(e, f, h)),
                    b + "ffn_gate_exps.weight",
                ),
                (
                    TextSource(m + "experts.gate_up_proj", select=lambda x: x[:, f:], shape=(e, f, h)),
                    b + "ffn_up_exps.weight",
                ),
                (m + "experts.down_proj", b + "ffn_down_exps.weight"),
            ]
        return [
            (m + "gate.weight", b + "ffn_gate_inp.weight"),
            *experts,
            (m + "shared_expert_gate.weight", b + "ffn_gate_inp_shexp.weight"),
            (m + "shared_expert.gate_proj.weight", b + "ffn_gate_shexp.weight"),
            (m + "shared_expert.up_proj.weight", b + "ffn_up_shexp.weight"),
            (m + "shared_expert.down_proj.weight", b + "ffn_down_shexp.weight"),
        ]  # fmt: skip

    def keep_f32(self, gguf_name: str) -> bool:
        """The routers, the shared experts' gates and the convolution kernels stay F32."""
        return gguf_name.endswith(_F32_SUFFIXES)

    def add_text_keys(self, w: Any, vocab: Vocab, file_type: int, name: str) -> None:
        """Qwen3-VL's keys (the head size; no DeepStack), the rotated part of a head, the layer pattern, the
        DeltaNet sizes and the experts'."""
        super().add_text_keys(w, vocab, file_type, name)
        t = self.text
        w.add_rope_dimension_count(t.rotary_dim)
        w.add_ssm_conv_kernel(t.linear_conv_kernel)
        w.add_ssm_state_size(t.linear_key_head_dim)
        w.add_ssm_group_count(t.linear_num_key_heads)
        w.add_ssm_time_step_rank(t.linear_num_value_heads)
        w.add_ssm_inner_size(t.linear_value_dim)
        w.add_array(RECURRENT_LAYERS_KEY.format(arch=self.family.gguf_text_arch), list(t.linear_layers))
        w.add_full_attention_interval(t.full_attention_interval)
        if t.num_experts:
            w.add_expert_count(t.num_experts)
            w.add_expert_used_count(t.num_experts_per_tok)
            w.add_expert_feed_forward_length(t.moe_intermediate_size)
            w.add_expert_shared_feed_forward_length(t.shared_expert_intermediate_size)
