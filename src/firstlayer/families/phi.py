"""Phi-1, 1.5 and 2: parallel blocks sharing one input_layernorm, partial rotary, optional
per-head q/k LayerNorms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from firstlayer.families.base import (
    PARALLEL,
    TINY,
    VLLM_BACKEND,
    Family,
    LayerExtras,
    Parts,
    has_module,
    register_family,
)

if TYPE_CHECKING:
    from torch import nn


@register_family("phi")
class Phi(Family):
    blocks = PARALLEL
    notes = "Phi-1, 1.5, 2: one shared norm, partial rotary, optional qk layernorm"
    defaults = {
        "phi": {"tie_word_embeddings": False, "qk_layernorm": False, "hidden_act": "gelu_new"}
    }
    gguf = {"phi2": "phi"}
    tiny = {**TINY, "intermediate_size": 128, "partial_rotary_factor": 0.5}
    has_plain_mlp = True
    vllm = VLLM_BACKEND

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        return True

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        qk = 4 * head_dim * cfg["qk_layernorm"]  # LayerNorm(head_dim), weight and bias, q and k
        return LayerExtras(True, True, True, 2, 1, qk_norm_weights=qk, lm_head_bias=True)

    def parts(self, model: nn.Module) -> Parts:
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
