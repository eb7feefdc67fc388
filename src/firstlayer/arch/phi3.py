"""Phi-3: Llama's layout with q, k and v fused into one qkv_proj (q | k | v, one after another)."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts


def parts(model: nn.Module) -> Parts:
    return Parts(
        embedding="model.embed_tokens",
        attn_norm="model.layers.0.input_layernorm",
        projections=("model.layers.0.self_attn.qkv_proj",),
    )


ADAPTER = Adapter(
    model_types=("phi3",),
    parts=parts,
    tiny={
        **TINY,
        "intermediate_size": 96,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
)
