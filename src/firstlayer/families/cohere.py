"""Cohere (Command R) and Cohere 2: Llama's names, parallel blocks that share one bias-free
LayerNorm, a tied LM head with a logit scale; optional per-head q/k norms (Cohere), sliding
windows and layers without RoPE (Cohere 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firstlayer.families.base import (
    PARALLEL,
    VLLM_BACKEND,
    LayerExtras,
    LlamaNames,
    VllmNotServed,
    register_family,
)


@register_family("cohere", "cohere2")
class Cohere(LlamaNames):
    blocks = PARALLEL
    notes = (
        "one shared LayerNorm; tied LM head with logit scale; optional per-head q/k norms "
        "(cohere), sliding windows and NoPE layers (cohere2)"
    )
    defaults = {
        "cohere": {"tie_word_embeddings": True, "attention_bias": False, "use_qk_norm": False},
        "cohere2": {"tie_word_embeddings": True, "attention_bias": False},
    }
    gguf = {"command-r": "cohere"}
    vllm = VLLM_BACKEND
    vllm_by_type = {
        "cohere2": VllmNotServed(
            "greedy tokens differ from vLLM's own Cohere2 class running the original"
        )
    }

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        return True

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        # One bias-free LayerNorm feeds attention and FFN; q/k norms have a gain per head.
        bias = bool(cfg.get("attention_bias", False))
        qk = (q_dim + e) * bool(cfg.get("use_qk_norm", False))
        return LayerExtras(
            bias, bias, norms_per_layer=1, qk_norm_weights=qk, is_bias_free_layernorm=True
        )

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        return {"use_qk_norm": has("blk.0.attn_q_norm.weight")}
