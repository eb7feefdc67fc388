"""StarCoder 2: Llama's names with LayerNorms, biases everywhere (`use_bias`), a plain MLP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firstlayer.families.base import VLLM_BACKEND, LayerExtras, LlamaNames, register_family


@register_family("starcoder2")
class StarCoder2(LlamaNames):
    notes = "LayerNorm, biases"
    defaults = {
        "starcoder2": {
            "tie_word_embeddings": True,
            "num_key_value_heads": 2,
            "use_bias": True,
            "hidden_act": "gelu_pytorch_tanh",
        }
    }
    gguf = {"starcoder2": "starcoder2"}
    has_plain_mlp = True
    vllm = VLLM_BACKEND

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = bool(cfg["use_bias"])
        return LayerExtras(bias, bias, bias, norm_vectors=2)

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        return {"use_bias": has("blk.0.attn_q.bias")}
