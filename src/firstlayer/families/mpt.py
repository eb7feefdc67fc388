"""MPT: ALiBi inside attention, one fused Wqkv (q | k | v); clip_qkv clamps it at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from firstlayer.families.base import Family, LayerExtras, Parts, VllmNotServed, register_family

if TYPE_CHECKING:
    from torch import nn


@register_family("mpt")
class Mpt(Family):
    notes = "ALiBi; fused Wqkv, clip_qkv at run time"
    defaults = {"mpt": {"tie_word_embeddings": True, "no_bias": True}}
    gguf = {"mpt": "mpt"}
    tiny = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=256)
    is_fused_qkv = True
    has_even_heads = True
    has_plain_mlp = True
    vllm = VllmNotServed("vLLM dropped MPT after 0.28")

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return 4 * d  # hard-coded in its MLP (expansion_ratio is not read)

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = not cfg["no_bias"]  # biases everywhere, norms included, unless no_bias
        return LayerExtras(bias, bias, bias, norm_vectors=1 + bias)

    def parts(self, model: nn.Module) -> Parts:
        block = "transformer.blocks.0"
        return Parts(
            embedding="transformer.wte",
            attn_norm=f"{block}.norm_1",
            projections=(f"{block}.attn.Wqkv",),
        )
