"""Granite: Llama's names, the embedding scaled by `embedding_multiplier` before layer 0."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from firstlayer.families.base import VLLM_BACKEND, LlamaNames, Parts, register_family

if TYPE_CHECKING:
    from torch import nn


@register_family("granite")
class Granite(LlamaNames):
    notes = "x * embedding_multiplier before layer 0: in the q/k/v columns, at run time for x"
    defaults = {
        "granite": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
    }
    gguf = {"granite": "granite"}
    vllm = VLLM_BACKEND

    def parts(self, model: nn.Module) -> Parts:
        multiplier = getattr(model.config, "embedding_multiplier", None)
        return dataclasses.replace(super().parts(model), embedding_multiplier=multiplier)


@register_family("granitemoe")
class GraniteMoe(Granite):
    notes = "x * embedding_multiplier before layer 0, as granite; MoE FFN stays"
    defaults = {
        "granitemoe": {
            "tie_word_embeddings": False,
            "attention_bias": False,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        }
    }
    is_moe = True
