"""PhiMoE: Llama's names with LayerNorms, MoE FFN (which stays: it reads h, not x)."""

from __future__ import annotations

import dataclasses
from typing import Any

from firstlayer.families.base import LayerExtras, LlamaNames, VllmNotServed, register_family


@register_family("phimoe")
class PhiMoe(LlamaNames):
    notes = "MoE FFN stays (it reads h, not x)"
    defaults = {
        "phimoe": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 8,
            "attention_bias": False,
            "lm_head_bias": False,
            "num_local_experts": 16,
            "num_experts_per_tok": 2,
        }
    }
    is_moe = True
    vllm = VllmNotServed("vLLM 0.32 has no PhiMoE model")

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        extras = super().layer_extras(cfg, q_dim, e, head_dim)
        return dataclasses.replace(extras, norm_vectors=2)  # LayerNorm
