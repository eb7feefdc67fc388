"""StableLM: Llama's names with LayerNorms, per-head q/k LayerNorms, parallel blocks by config
(`use_parallel_residual`, which drops post_attention_layernorm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firstlayer.families.base import (
    BY_CONFIG,
    LayerExtras,
    LlamaNames,
    VllmNotServed,
    register_family,
)


@register_family("stablelm")
class StableLm(LlamaNames):
    blocks = BY_CONFIG
    notes = (
        "`use_parallel_residual`; per-head q/k LayerNorms folded in (parallel) or run on the "
        "stored q/k (serial)"
    )
    defaults = {
        "stablelm": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 32,
            "use_qkv_bias": False,
            "qk_layernorm": False,
            "use_parallel_residual": False,
        }
    }
    gguf = {"stablelm": "stablelm"}
    has_even_heads = True
    vllm = VllmNotServed(
        "vLLM's StableLM has no per-head q/k LayerNorms (qk_layernorm configs fail in vLLM "
        "itself); not tested without them"
    )

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg["use_parallel_residual"])

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        norms = 1 if cfg["use_parallel_residual"] else 2
        qk = (q_dim + e) * cfg["qk_layernorm"]  # one LayerNorm per head, gain and bias
        return LayerExtras(
            cfg["use_qkv_bias"], norm_vectors=2, norms_per_layer=norms, qk_norm_weights=qk
        )

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        return {
            "use_qkv_bias": has("blk.0.attn_q.bias"),
            "use_parallel_residual": not has("blk.0.ffn_norm.weight"),
            "qk_layernorm": has("blk.0.attn_q_norm.weight"),
        }
