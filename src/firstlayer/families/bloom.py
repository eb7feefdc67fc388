"""BLOOM: ALiBi inside attention, and a LayerNorm on the embedding before layer 0.

word_embeddings_layernorm is token-local: it stays at run time (the tied LM head reads the
stored, plain x) and the q/k/v columns are computed after it. query_key_value interleaves q, k, v
inside each head, as NeoX does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firstlayer.errors import FirstLayerError
from firstlayer.families.base import (
    TINY,
    Family,
    LayerExtras,
    Parts,
    VllmNotServed,
    register_family,
)

if TYPE_CHECKING:
    from torch import nn


@register_family("bloom")
class Bloom(Family):
    notes = "ALiBi; the embedding's LayerNorm: in the q/k/v columns, at run time for x"
    defaults = {"bloom": {"tie_word_embeddings": True}}
    gguf = {"bloom": "bloom"}
    tiny = {k: v for k, v in TINY.items() if k != "max_position_embeddings"}
    is_fused_qkv = True
    has_even_heads = True
    has_plain_mlp = True
    vllm = VllmNotServed(
        "vLLM's BLOOM layer 0 is not patched yet, and its Transformers backend refuses BLOOM "
        "(no position_ids)"
    )

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return 4 * d  # hard-coded in its MLP

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        return LayerExtras(True, True, True, norm_vectors=2, embedding_norm_vectors=2)

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        return {"tie_word_embeddings": True}  # as transformers reads BLOOM GGUF files

    def parts(self, model: nn.Module) -> Parts:
        if model.config.apply_residual_connection_post_layernorm:
            # The residual would be norm(x), which the table's rows replace on the way in.
            raise FirstLayerError(
                "this BLOOM config sets apply_residual_connection_post_layernorm, whose layer 0 "
                "adds its normed input back: not supported"
            )
        block = "transformer.h.0"
        return Parts(
            embedding="transformer.word_embeddings",
            attn_norm=f"{block}.input_layernorm",
            projections=(f"{block}.self_attention.query_key_value",),
            embedding_norm="transformer.word_embeddings_layernorm",
        )
