"""Qwen 2 and 3, dense and MoE: Llama's names; q/k/v biases (2) or per-head q/k norms (3)."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import (
    LayerExtras,
    LlamaNames,
    VllmOwnClass,
    register_family,
    required,
)

VLLM_WITH_HEAD_NORMS = VllmOwnClass(head_norms=("q_norm", "k_norm"))


@register_family("qwen2")
class Qwen2(LlamaNames):
    notes = "q/k/v biases in the table"
    defaults = {"qwen2": {"tie_word_embeddings": False, "num_key_value_heads": 32}}
    gguf = {"qwen2": "qwen2"}

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        return LayerExtras(qkv_bias=True)  # hard-coded, whatever the config says


@register_family("qwen3")
class Qwen3(LlamaNames):
    notes = "per-head q/k norms run on the stored q/k, before RoPE"
    defaults = {
        "qwen3": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "attention_bias": False,
        }
    }
    gguf = {"qwen3": "qwen3"}
    vllm = VLLM_WITH_HEAD_NORMS

    def qk_norm_weights(self, q_dim: int, e: int, head_dim: int) -> int:
        return 2 * head_dim  # one RMSNorm(head_dim) for q, one for k


@register_family("qwen2_moe")
class Qwen2Moe(LlamaNames):
    notes = "q/k/v biases in the table; MoE with a shared expert stays"
    defaults = {
        "qwen2_moe": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 16,
            "qkv_bias": True,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
        }
    }
    gguf = {"qwen2moe": "qwen2_moe"}
    is_moe = True

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return required(cfg, ("moe_intermediate_size",))

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        return LayerExtras(
            qkv_bias=bool(cfg["qkv_bias"]),
            shared_expert_hidden=cfg["shared_expert_intermediate_size"],
        )


@register_family("qwen3_moe")
class Qwen3Moe(Qwen3):
    notes = "per-head q/k norms run on the stored q/k; MoE stays"
    defaults = {
        "qwen3_moe": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 4,
            "attention_bias": False,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
        }
    }
    gguf = {"qwen3moe": "qwen3_moe"}
    is_moe = True
    # The config.json names the count num_experts and transformers writes num_local_experts: a
    # default under one name would hide a value under the other, so it is applied last.
    default_experts = 128

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return required(cfg, ("moe_intermediate_size",))
