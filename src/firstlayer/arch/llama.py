"""Llama and the families that keep its module names: mistral, mixtral, qwen2, qwen3, gemma 1-3."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts, has_module


def parts(model: nn.Module) -> Parts:
    block = "model.layers.0"
    attn = f"{block}.self_attn"
    projections = (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    # Qwen3 and Gemma 3 normalise each head of q and k before RoPE: token-local, so it is folded in.
    head_norms = {
        f"{attn}.{p}_proj": f"{attn}.{p}_norm"
        for p in "qk"
        if has_module(model, f"{attn}.{p}_norm")
    }
    return Parts(
        embedding="model.embed_tokens",
        attn_norm=f"{block}.input_layernorm",
        projections=projections,
        head_norms=head_norms,
    )


ADAPTER = Adapter(
    model_types=("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    parts=parts,
    tiny={**TINY, "intermediate_size": 96, "num_key_value_heads": 2},
)
