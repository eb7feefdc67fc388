"""Nemotron: Llama's names, LayerNorm1P (gain + 1, and a bias), partial rotary, a relu2 MLP."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import LayerExtras, LlamaNames, register_family


@register_family("nemotron")
class Nemotron(LlamaNames):
    notes = "LayerNorm1P (gain + 1), partial rotary"
    defaults = {
        "nemotron": {
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "relu2",
        }
    }
    has_plain_mlp = True

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = bool(cfg.get("attention_bias", False))  # o_proj biased with q, k and v
        return LayerExtras(bias, bias, bool(cfg["mlp_bias"]), norm_vectors=2)
