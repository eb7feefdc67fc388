"""Building table rows: layer 0's token-local modules, copied in float32, run on the vocabulary a
chunk at a time."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.families import Parts
from firstlayer.table.layout import BLOCKS, TableLayout

# Rows per chunk: the work buffers stay a few MB even for 256k-token vocabularies.
CHUNK_ROWS = 2048
# Built in float32 (or float64 when the model is), whatever the model runs in.
BUILD_DTYPES = (torch.float32, torch.float64)


def scale_in(scale: float, dtype: torch.dtype) -> Tensor:
    """An embedding scale as the model multiplies by it: a float32 scalar cast to the rows' dtype
    first (Gemma: 55.4256 -> 55.5 in bf16); the table must use the same factor."""
    return torch.tensor(scale, dtype=torch.float32).to(dtype)


class TokenLocal(nn.Module):
    """Layer 0's token-local modules, copied in float32: computes table rows for token ids.

    A copy, so the caller may go on to replace the originals in the model (convert streams rows to
    disk after the model has been patched); the embedding weight is shared, not copied.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: Parts,
        layout: TableLayout,
        dtype: torch.dtype | None = None,
        embedding_weight: Any = None,
    ):
        """`dtype` overrides the build dtype: verify computes the rows as a bfloat16 model would.
        `embedding_weight` stands in for the embedding's weight: anything indexable by a range
        of ids with `shape` and `dtype` (an out-of-core conversion reads rows from disk)."""
        super().__init__()
        embedding = model.get_submodule(parts.embedding)
        self.embedding_weight = embedding.weight if embedding_weight is None else embedding_weight
        self.build_dtype = dtype or (
            self.embedding_weight.dtype
            if self.embedding_weight.dtype in BUILD_DTYPES
            else torch.float32
        )
        scale = parts.embedding_scale
        # The factor in the embedding's dtype, as the model multiplies by it, then widened.
        self.scale = (
            None if scale is None else scale_in(scale, embedding.weight.dtype).to(self.build_dtype)
        )

        def copied(name: str | None) -> nn.Module:
            if name is None:
                return nn.Identity()
            return copy.deepcopy(model.get_submodule(name)).to(self.build_dtype).eval()

        self.embedding_multiplier = parts.embedding_multiplier
        self.embedding_norm = copied(parts.embedding_norm)
        self.attn_norm = copied(parts.attn_norm)
        self.projections = nn.ModuleList(copied(name) for name in parts.projections)
        self.head_norms = nn.ModuleList(
            copied(parts.head_norms.get(name)) for name in parts.projections
        )
        self.has_head_norm = [name in parts.head_norms for name in parts.projections]
        self.is_parallel = layout.is_parallel
        if layout.is_parallel:
            # The first columns are added to attention's output as they are: nothing may run on
            # the embedding at run time but what ran on it here.
            assert not parts.has_steps_before_layer0, "parallel blocks with steps before layer 0"
            self.mlp_norm = copied(parts.mlp_norm) if parts.mlp_norm else self.attn_norm
            self.mlp = copied(parts.mlp)
        self.layout = layout

    @torch.inference_mode()
    def residual(self, ids: Tensor) -> Tensor:
        """The first D columns for token ids (N,): x, or x + mlp(n2(x)) for parallel blocks."""
        x_plain = self.embedding_weight[ids].to(self.build_dtype)  # (N, D)
        if not self.is_parallel:
            return x_plain  # unscaled: an embedding scale is applied at run time
        x = x_plain if self.scale is None else x_plain * self.scale
        return x + self.mlp(self.mlp_norm(x)[None])[0]  # (1, N, D), as qkv's Linears

    @torch.inference_mode()
    def qkv(self, ids: Tensor) -> Tensor:
        """The q, k, v columns for token ids (N,): (N, W - D)."""
        x = self.embedding_weight[ids].to(self.build_dtype)  # (N, D)
        if self.scale is not None:
            x = x * self.scale
        if self.embedding_multiplier is not None:
            x = x * self.embedding_multiplier
        normed = self.attn_norm(self.embedding_norm(x))
        blocks = []
        for projection, head_norm, has_norm in zip(
            self.projections, self.head_norms, self.has_head_norm, strict=True
        ):
            # (1, N, D) -> (N, width): a Linear sees (B, T, D) as in the model, for a quantized
            # one's sake (compressed-tensors' per-token input scales reduce all but dims 0, 1).
            out = projection(normed[None])[0]
            if has_norm:
                # per-head norm: (N, H*Dh) -> (N, H, Dh) -> (N, H*Dh); a full-width one
                # (OLMo 2) is one "head" of H*Dh. Its last gain dimension says which.
                head_dim = next(head_norm.parameters()).shape[-1]
                out = head_norm(out.unflatten(-1, (-1, head_dim))).flatten(-2)
            blocks.append(out)
        rows = torch.cat(blocks, dim=-1)
        assert rows.shape == (len(ids), self.layout.qkv_width), rows.shape
        return rows

    def rows(self, block: str, ids: Tensor) -> Tensor:
        assert block in BLOCKS, block
        return self.residual(ids) if block == "residual" else self.qkv(ids)


def table_chunks(
    token_local: TokenLocal, vocab_size: int, block: str, chunk_rows: int | None = None
) -> Iterator[tuple[int, Tensor]]:
    """(first id, rows of `block`) for the whole vocabulary in order, `chunk_rows` ids at a time."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    device = token_local.embedding_weight.device
    for start in range(0, vocab_size, chunk_rows):
        ids = torch.arange(start, min(start + chunk_rows, vocab_size), device=device)
        yield start, token_local.rows(block, ids)
