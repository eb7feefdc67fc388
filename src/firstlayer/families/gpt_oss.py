"""gpt-oss: Llama's names, q/k/v biases, attention sinks, alternating sliding windows, MoE with
biased experts."""

from __future__ import annotations

import dataclasses
from typing import Any

from firstlayer.families.base import (
    HEADS,
    LayerExtras,
    LlamaNames,
    VllmOwnClass,
    integer,
    register_family,
    required,
)


@register_family("gpt_oss")
class GptOss(LlamaNames):
    notes = "q/k/v biases in the table; sinks, alternating sliding windows and MoE stay"
    defaults = {
        "gpt_oss": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "attention_bias": True,
            "num_local_experts": 128,
            "num_experts_per_tok": 4,
        }
    }
    is_moe = True
    vllm = VllmOwnClass(attention="attn")  # the sinks stay in vLLM's attention

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        extras = super().layer_extras(cfg, q_dim, e, head_dim)
        # Every expert's projections are biased, whatever mlp_bias says.
        return dataclasses.replace(extras, mlp_bias=True)

    def small_per_layer(self, cfg: dict[str, Any]) -> int:
        # One sink per head, one router bias per expert.
        return required(cfg, HEADS) + integer(cfg, ("num_local_experts",), 1)
