"""Phi-1, 1.5 and 2: one input_layernorm shared by attention and MLP, partial rotary."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts, has_module


def parts(model: nn.Module) -> Parts:
    block = "model.layers.0"
    attn = f"{block}.self_attn"
    head_norms = {
        f"{attn}.{p}_proj": f"{attn}.{p}_layernorm"
        for p in "qk"
        if has_module(model, f"{attn}.{p}_layernorm")
    }
    return Parts(
        embedding="model.embed_tokens",
        attn_norm=f"{block}.input_layernorm",
        projections=(f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
        head_norms=head_norms,
        mlp=f"{block}.mlp",
    )


ADAPTER = Adapter(
    model_types=("phi",),
    parts=parts,
    tiny={**TINY, "intermediate_size": 128, "partial_rotary_factor": 0.5},
)
