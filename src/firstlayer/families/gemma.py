"""Gemma 1, 2 and 3: Llama's names, the embedding scaled by sqrt(D), head_dim != D / heads;
Gemma 2 and 3 add norms after attention and around the FFN, Gemma 3 norms q and k per head."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from firstlayer.families.base import LayerExtras, LlamaNames, Parts, VllmOwnClass, register_family

if TYPE_CHECKING:
    from torch import nn

# vLLM multiplies the embedding by the base model's `normalizer` buffer.
VLLM_GEMMA = VllmOwnClass(scale="model.normalizer")


@register_family("gemma", "gemma2", "gemma3_text")
class Gemma(LlamaNames):
    notes = (
        "x scaled by sqrt(d) at run time; head_dim != d/n_heads; sandwich norms, "
        "sliding-window layer 0 (gemma3)"
    )
    defaults = {
        "gemma": {
            "tie_word_embeddings": True,
            "num_key_value_heads": 16,
            "head_dim": 256,
            "attention_bias": False,
            "hidden_act": "gelu_pytorch_tanh",
        },
        "gemma2": {
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "attention_bias": False,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        "gemma3_text": {
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "attention_bias": False,
            "hidden_activation": "gelu_pytorch_tanh",
        },
    }
    gguf = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
    vllm = VLLM_GEMMA
    vllm_by_type = {"gemma3_text": dataclasses.replace(VLLM_GEMMA, head_norms=("q_norm", "k_norm"))}

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = bool(cfg.get("attention_bias", False))
        t = cfg["model_type"]
        qk = 2 * head_dim if t == "gemma3_text" else 0
        return LayerExtras(bias, bias, norms_per_layer=2 if t == "gemma" else 4, qk_norm_weights=qk)

    def parts(self, model: nn.Module) -> Parts:
        # Read from the Python float Gemma keeps beside its buffer: on the meta device
        # (transformers' empty init) the buffer holds no value.
        embedding = model.get_submodule("model.embed_tokens")
        scale = float(embedding.scalar_embed_scale)
        return dataclasses.replace(super().parts(model), embedding_scale=scale)
