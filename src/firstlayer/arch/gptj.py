"""GPT-J: one norm (ln_1) shared by attention and MLP; RoPE rotates interleaved pairs."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import Adapter, Parts


def parts(model: nn.Module) -> Parts:
    block = "transformer.h.0"
    return Parts(
        embedding="transformer.wte",
        attn_norm=f"{block}.ln_1",
        projections=(f"{block}.attn.q_proj", f"{block}.attn.k_proj", f"{block}.attn.v_proj"),
        mlp=f"{block}.mlp",
    )


ADAPTER = Adapter(
    model_types=("gptj",),
    parts=parts,
    tiny=dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=256, n_positions=256),
)
