"""EXAONE 4: Llama's names, norms only after attention and FFN, per-head q/k norms."""

from __future__ import annotations

import dataclasses
from typing import Any

from firstlayer.families.base import VLLM_BACKEND, LayerExtras, LlamaNames, register_family


@register_family("exaone4")
class Exaone4(LlamaNames):
    notes = "no norm before attention; per-head q/k norms run on the stored q/k"
    defaults = {"exaone4": {"tie_word_embeddings": False, "num_key_value_heads": 32}}
    vllm = VLLM_BACKEND

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        extras = super().layer_extras(cfg, q_dim, e, head_dim)
        return dataclasses.replace(extras, has_attn_norm=False)

    def qk_norm_weights(self, q_dim: int, e: int, head_dim: int) -> int:
        return 2 * head_dim
