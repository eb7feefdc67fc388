"""Apertus: Llama's names, the attention norm called `attention_layernorm`, per-head q/k norms,
an up/down MLP with xIELU (whose two gains are parameters)."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import LlamaNames, VllmOwnClass, register_family


@register_family("apertus")
class Apertus(LlamaNames):
    notes = "`attention_layernorm`; per-head q/k norms run on the stored q/k"
    defaults = {
        "apertus": {"tie_word_embeddings": False, "attention_bias": False, "hidden_act": "xielu"}
    }
    has_plain_mlp = True
    vllm = VllmOwnClass(norms=("attention_layernorm",), head_norms=("q_norm", "k_norm"))

    def qk_norm_weights(self, q_dim: int, e: int, head_dim: int) -> int:
        return 2 * head_dim

    def small_per_layer(self, cfg: dict[str, Any]) -> int:
        return 2  # xIELU's alpha_p and alpha_n
