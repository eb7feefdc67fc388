"""GPT-NeoX and Pythia: one fused query_key_value that interleaves q, k and v inside each head
([H, 3 * Dh]; the table keeps that order and the attention module splits it as before), parallel
blocks by config (`use_parallel_residual`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firstlayer.families.base import (
    BY_CONFIG,
    TINY,
    VLLM_BACKEND,
    Family,
    LayerExtras,
    Parts,
    register_family,
)

if TYPE_CHECKING:
    from torch import nn


@register_family("gpt_neox")
class GptNeox(Family):
    blocks = BY_CONFIG
    notes = "`use_parallel_residual`; q, k, v interleaved per head"
    defaults = {
        "gpt_neox": {
            "tie_word_embeddings": False,
            "use_parallel_residual": True,
            "attention_bias": True,
            "hidden_act": "gelu",
        }
    }
    gguf = {"gptneox": "gpt_neox"}
    tiny = {**TINY, "intermediate_size": 128, "rotary_pct": 0.25, "use_parallel_residual": True}
    is_fused_qkv = True
    has_even_heads = True
    has_plain_mlp = True
    vllm = VLLM_BACKEND

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg["use_parallel_residual"])

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        # Both norms exist either way; parallel blocks feed the MLP post_attention_layernorm(x).
        bias, parallel = bool(cfg.get("attention_bias", False)), self.is_parallel(cfg)
        return LayerExtras(bias, bias, True, norm_vectors=2, has_mlp_norm=parallel)

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        parallel = meta("gptneox.use_parallel_residual")
        return {"use_parallel_residual": parallel is None or bool(parallel)}

    def parts(self, model: nn.Module) -> Parts:
        block = "gpt_neox.layers.0"
        return Parts(
            embedding="gpt_neox.embed_in",
            attn_norm=f"{block}.input_layernorm",
            projections=(f"{block}.attention.query_key_value",),
            mlp_norm=f"{block}.post_attention_layernorm",
            mlp=f"{block}.mlp",
        )
