"""Phi-3: Llama's layout with q, k and v fused into one qkv_proj (q | k | v, one after another)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firstlayer.families.base import TINY, LlamaNames, Parts, register_family

if TYPE_CHECKING:
    from torch import nn


@register_family("phi3")
class Phi3(LlamaNames):
    notes = "fused qkv_proj"
    defaults = {"phi3": {"tie_word_embeddings": False}}
    gguf = {"phi3": "phi3"}
    tiny = {
        **TINY,
        "intermediate_size": 96,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    is_fused_qkv = True

    def parts(self, model: nn.Module) -> Parts:
        return Parts(
            embedding="model.embed_tokens",
            attn_norm="model.layers.0.input_layernorm",
            projections=("model.layers.0.self_attn.qkv_proj",),
        )
