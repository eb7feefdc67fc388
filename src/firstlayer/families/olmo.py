"""OLMo, OLMo 2 and 3, OLMoE: Llama's names. OLMo's norms have no weights and clip_qkv clamps q,
k and v (at run time, on the stored columns); OLMo 2 and 3 norm only after attention and norm q
and k across all heads."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import (
    VLLM_BACKEND,
    LayerExtras,
    LlamaNames,
    VllmOwnClass,
    register_family,
)


@register_family("olmo")
class Olmo(LlamaNames):
    notes = "norms without weights; clip_qkv clamps the stored q/k/v at run time"
    defaults = {"olmo": {"tie_word_embeddings": False, "attention_bias": False}}
    gguf = {"olmo": "olmo"}
    vllm = VLLM_BACKEND

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = bool(cfg.get("attention_bias", False))
        return LayerExtras(bias, bias, norm_vectors=0)  # LayerNorm without weights


@register_family("olmo2", "olmo3")
class Olmo2(LlamaNames):
    notes = "no norm before attention; q/k norms across all heads run on the stored q/k"
    defaults = {
        "olmo2": {"tie_word_embeddings": False, "attention_bias": False},
        "olmo3": {"tie_word_embeddings": False, "attention_bias": False},
    }
    gguf = {"olmo2": "olmo2"}
    vllm = VLLM_BACKEND

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        # Norms after attention and FFN, and q/k normalised over their full width.
        bias = bool(cfg.get("attention_bias", False))
        return LayerExtras(bias, bias, has_attn_norm=False, qk_norm_weights=q_dim + e)


@register_family("olmoe")
class Olmoe(LlamaNames):
    notes = "q/k norms across all heads run on the stored q/k; MoE stays"
    defaults = {
        "olmoe": {
            "tie_word_embeddings": False,
            "attention_bias": False,
            "num_experts": 64,
            "num_experts_per_tok": 8,
        }
    }
    is_moe = True
    vllm = VllmOwnClass(head_norms=("q_norm", "k_norm"))  # spanning all heads

    def qk_norm_weights(self, q_dim: int, e: int, head_dim: int) -> int:
        return q_dim + e  # over the full width, as OLMo 2
