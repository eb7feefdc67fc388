"""Falcon: one fused query_key_value (multi-query, or grouped by kv head in the new decoder
architecture of Falcon-40B/180B), parallel attention and MLP (one shared norm, or one each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firstlayer.families.base import (
    BY_CONFIG,
    TINY,
    Family,
    LayerExtras,
    Parts,
    VllmOwnClass,
    has_module,
    integer,
    register_family,
)

if TYPE_CHECKING:
    from torch import nn


@register_family("falcon")
class Falcon(Family):
    blocks = BY_CONFIG
    notes = "`parallel_attn` or the new decoder architecture; multi-query or grouped kv"
    defaults = {
        "falcon": {
            "tie_word_embeddings": True,
            "parallel_attn": True,
            "multi_query": True,
            "new_decoder_architecture": False,
            "bias": False,
            "alibi": False,
            "activation": "gelu",
        }
    }
    gguf = {"falcon": "falcon"}
    tiny = {**TINY, "multi_query": True, "parallel_attn": True, "alibi": False, "bias": False}
    is_fused_qkv = True
    has_even_heads = True
    has_plain_mlp = True
    vllm = VllmOwnClass(
        layer="transformer.h.0",
        attention="self_attention",
        qkv="query_key_value",
        kind="parallel_with_bias",
        norms=("input_layernorm", "ln_attn", "ln_mlp"),
        mlp="mlp",
    )

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        # The new decoder architecture is parallel whatever parallel_attn says.
        return bool(cfg["new_decoder_architecture"] or cfg["parallel_attn"])

    def kv_heads(self, cfg: dict[str, Any], n_heads: int) -> int:
        # Falcon-7B: one K/V head (multi_query); Falcon-40B: num_kv_heads groups; else MHA.
        if cfg["new_decoder_architecture"]:
            return integer(cfg, ("num_kv_heads",), default=n_heads)
        return 1 if cfg["multi_query"] else n_heads

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return integer(cfg, ("ffn_hidden_size",), default=4 * d)  # left out to mean 4d

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        # Two norms when serial, or parallel with num_ln_in_parallel_attn == 2 (the new decoder
        # architecture's default); one shared norm otherwise.
        b, parallel = bool(cfg["bias"]), self.is_parallel(cfg)
        n_ln = cfg.get("num_ln_in_parallel_attn") or (2 if cfg["new_decoder_architecture"] else 1)
        two = not parallel or n_ln == 2
        return LayerExtras(b, b, b, 2, 2 if two else 1, has_mlp_norm=parallel and two)

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        # Falcon-40B style files carry a second norm (ln_mlp) per block.
        new = has("blk.0.attn_norm_2.weight")
        n_kv = config.get("num_key_value_heads")
        return {
            "tie_word_embeddings": True,  # as transformers reads Falcon GGUF files, output or not
            "new_decoder_architecture": new,
            "multi_query": n_kv == 1 and not new,
            "num_kv_heads": n_kv,
            "parallel_attn": True,
            "bias": has("blk.0.attn_qkv.bias"),
            "ffn_hidden_size": meta("falcon.feed_forward_length"),
        }

    def parts(self, model: nn.Module) -> Parts:
        block = "transformer.h.0"
        has_two_norms = has_module(model, f"{block}.ln_attn")  # the new decoder architecture
        return Parts(
            embedding="transformer.word_embeddings",
            attn_norm=f"{block}.ln_attn" if has_two_norms else f"{block}.input_layernorm",
            projections=(f"{block}.self_attention.query_key_value",),
            mlp_norm=f"{block}.ln_mlp" if has_two_norms else None,
            mlp=f"{block}.mlp",
        )
