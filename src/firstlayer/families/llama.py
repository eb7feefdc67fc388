"""Llama and Mistral, and the families that differ from them in nothing firstlayer reads but
their config defaults, MoE, MLP or vLLM route (Mixtral, Helium, Arcee, SmolLM3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from firstlayer.families.base import VLLM_BACKEND, LlamaNames, VllmNotServed, register_family


@register_family("llama", "mistral")
class Llama(LlamaNames):
    notes = "Llama's names"
    defaults = {
        "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
        "mistral": {"tie_word_embeddings": False, "num_key_value_heads": 8},
    }
    gguf = {"llama": "llama", "mistral": "mistral"}

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        n_experts = meta(f"{arch}.expert_count") or 0
        if arch == "llama" and n_experts > 1:
            return {
                "model_type": "mixtral",
                "num_local_experts": n_experts,
                "num_experts_per_tok": meta(f"{arch}.expert_used_count"),
            }
        if arch == "llama" and "mistral" in str(config["_name_or_path"]).lower():
            return {"model_type": "mistral"}  # llama.cpp files Mistral under llama
        return super().gguf_config(arch, meta, has, config)


@register_family("mixtral")
class Mixtral(LlamaNames):
    notes = "MoE FFN stays (it reads h, not x)"
    defaults = {
        "mixtral": {
            "tie_word_embeddings": False,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        }
    }
    is_moe = True


@register_family("helium")
class Helium(LlamaNames):
    notes = "Llama's names"
    defaults = {
        "helium": {
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "num_key_value_heads": 20,
            "head_dim": 128,
        }
    }
    vllm = VllmNotServed("vLLM 0.32 has no Helium model")


@register_family("arcee")
class Arcee(LlamaNames):
    notes = "Llama's names"
    defaults = {
        "arcee": {
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "relu2",
        }
    }
    has_plain_mlp = True  # up and down, no gate
    vllm = VLLM_BACKEND


@register_family("smollm3")
class SmolLM3(LlamaNames):
    notes = "layers without RoPE work unchanged"
    defaults = {
        "smollm3": {"tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False}
    }
    gguf = {"smollm3": "smollm3"}
    vllm = VLLM_BACKEND
