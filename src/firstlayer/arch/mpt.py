"""MPT: ALiBi inside attention, one fused Wqkv (q | k | v); clip_qkv clamps it at run time."""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import Adapter, Parts


def parts(model: nn.Module) -> Parts:
    block = "transformer.blocks.0"
    return Parts(
        embedding="transformer.wte",
        attn_norm=f"{block}.norm_1",
        projections=(f"{block}.attn.Wqkv",),
    )


ADAPTER = Adapter(
    model_types=("mpt",),
    parts=parts,
    tiny=dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=256),
)
