"""GPT-J: parallel blocks whose attention and MLP share one norm (ln_1); RoPE rotates
interleaved pairs; the MLP's width defaults to 4d (`n_inner`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from firstlayer.families.base import (
    PARALLEL,
    Family,
    LayerExtras,
    Parts,
    VllmOwnClass,
    integer,
    register_family,
)

if TYPE_CHECKING:
    from torch import nn


@register_family("gptj")
class GptJ(Family):
    blocks = PARALLEL
    notes = "one shared norm, interleaved rotary"
    defaults = {"gptj": {"tie_word_embeddings": False, "activation_function": "gelu_new"}}
    gguf = {"gptj": "gptj"}
    tiny = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=256, n_positions=256)
    has_even_heads = True
    has_plain_mlp = True
    vllm = VllmOwnClass(
        layer="transformer.h.0", attention="attn", kind="parallel", norms=("ln_1",), mlp="mlp"
    )

    def is_parallel(self, cfg: dict[str, Any]) -> bool:
        return True

    def ffn_hidden(self, cfg: dict[str, Any], d: int) -> int:
        return integer(cfg, ("n_inner",), default=4 * d)  # left out to mean 4d

    def layer_extras(self, cfg: dict[str, Any], q_dim: int, e: int, head_dim: int) -> LayerExtras:
        return LayerExtras(mlp_bias=True, norm_vectors=2, norms_per_layer=1, lm_head_bias=True)

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        return {"n_inner": meta("gptj.feed_forward_length")}

    def parts(self, model: nn.Module) -> Parts:
        block = "transformer.h.0"
        return Parts(
            embedding="transformer.wte",
            attn_norm=f"{block}.ln_1",
            projections=(f"{block}.attn.q_proj", f"{block}.attn.k_proj", f"{block}.attn.v_proj"),
            mlp=f"{block}.mlp",
        )
