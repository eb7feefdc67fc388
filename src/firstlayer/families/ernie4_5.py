"""ERNIE 4.5: Llama's names, every projection biased by `use_bias`."""

from __future__ import annotations

from typing import Any

from firstlayer.families.base import LayerExtras, LlamaNames, VllmNotServed, register_family


@register_family("ernie4_5")
class Ernie45(LlamaNames):
    notes = "q/k/v biases in the table"
    defaults = {
        "ernie4_5": {
            "tie_word_embeddings": True,
            "use_bias": False,
            "num_key_value_heads": 2,
            "head_dim": 128,
        }
    }
    vllm = VllmNotServed(
        "greedy tokens differ from vLLM's own Ernie 4.5 class running the original, and its "
        "Transformers backend does not build it"
    )

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        bias = bool(cfg["use_bias"])
        return LayerExtras(bias, bias, bias)
