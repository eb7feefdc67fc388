"""GPT-NeoX and Pythia: fused query_key_value, parallel residual when the config says so."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts


def parts(model: nn.Module) -> Parts:
    block = "gpt_neox.layers.0"
    # query_key_value interleaves q, k, v inside each head ([H, 3 * Dh]); the table keeps it
    # and the attention module splits it as before.
    return Parts(
        embedding="gpt_neox.embed_in",
        attn_norm=f"{block}.input_layernorm",
        projections=(f"{block}.attention.query_key_value",),
        mlp_norm=f"{block}.post_attention_layernorm",
        mlp=f"{block}.mlp",
    )


ADAPTER = Adapter(
    model_types=("gpt_neox",),
    parts=parts,
    tiny={**TINY, "intermediate_size": 128, "rotary_pct": 0.25, "use_parallel_residual": True},
)
