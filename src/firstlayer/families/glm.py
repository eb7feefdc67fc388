"""GLM and GLM-4: Llama's names, q/k/v biased by attention_bias; GLM-4 adds norms after
attention and after the FFN (sandwich norms)."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import (
    VLLM_BACKEND,
    LayerExtras,
    LlamaNames,
    VllmOwnClass,
    register_family,
)


@register_family("glm", "glm4")
class Glm(LlamaNames):
    notes = "q/k/v biases in the table; sandwich norms (glm4)"
    defaults = {
        "glm": {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "num_key_value_heads": 2,
            "head_dim": 128,
        },
        "glm4": {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "num_key_value_heads": 2,
            "head_dim": 128,
        },
    }
    vllm = VLLM_BACKEND
    vllm_by_type = {"glm4": VllmOwnClass()}  # its norms after attention and MLP stay

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        # q, k and v biased by attention_bias; o by attention_out_bias where a family has it.
        qkv_bias = bool(cfg.get("attention_bias", False))
        o_bias = bool(cfg.get("attention_out_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        norms = 4 if cfg["model_type"] == "glm4" else 2
        return LayerExtras(qkv_bias, o_bias, mlp_bias, norms_per_layer=norms)
