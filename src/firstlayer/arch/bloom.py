"""BLOOM: ALiBi inside attention, and a LayerNorm on the embedding before layer 0.

word_embeddings_layernorm is token-local: it stays at run time (the tied LM head reads the
stored, plain x) and the q/k/v columns are computed after it. query_key_value interleaves q, k, v
inside each head, as NeoX does.
"""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts
from firstlayer.errors import FirstLayerError


def parts(model: nn.Module) -> Parts:
    if model.config.apply_residual_connection_post_layernorm:
        # The residual would be norm(x), which the table's rows replace on the way in.
        raise FirstLayerError(
            "this BLOOM config sets apply_residual_connection_post_layernorm, whose layer 0 adds "
            "its normed input back: not supported"
        )
    block = "transformer.h.0"
    return Parts(
        embedding="transformer.word_embeddings",
        attn_norm=f"{block}.input_layernorm",
        projections=(f"{block}.self_attention.query_key_value",),
        embedding_norm="transformer.word_embeddings_layernorm",
    )


ADAPTER = Adapter(
    model_types=("bloom",),
    parts=parts,
    tiny={k: v for k, v in TINY.items() if k != "max_position_embeddings"},
)
