"""Falcon: fused query_key_value (multi-query or grouped), parallel attention and MLP."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts, has_module


def parts(model: nn.Module) -> Parts:
    block = "transformer.h.0"
    # The new decoder architecture (Falcon-40B/180B) gives attention and MLP a norm each.
    has_two_norms = has_module(model, f"{block}.ln_attn")
    return Parts(
        embedding="transformer.word_embeddings",
        attn_norm=f"{block}.ln_attn" if has_two_norms else f"{block}.input_layernorm",
        projections=(f"{block}.self_attention.query_key_value",),
        mlp_norm=f"{block}.ln_mlp" if has_two_norms else None,
        mlp=f"{block}.mlp",
    )


ADAPTER = Adapter(
    model_types=("falcon",),
    parts=parts,
    tiny={**TINY, "multi_query": True, "parallel_attn": True, "alibi": False, "bias": False},
)
