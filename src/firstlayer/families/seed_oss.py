"""Seed-OSS: Llama's names, q/k/v biased by attention_bias, o by attention_out_bias."""

from __future__ import annotations

from firstlayer.families.base import register_family
from firstlayer.families.glm import Glm


@register_family("seed_oss")
class SeedOss(Glm):
    notes = "q/k/v biases in the table"
    defaults = {
        "seed_oss": {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "mlp_bias": False,
            "attention_out_bias": False,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    }
