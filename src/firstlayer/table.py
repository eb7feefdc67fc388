"""The per-token table of arXiv 2402.13388, sections "parallel" and "serial".

A row holds, for one token id, everything layer 0 computes from that token alone:

    serial:   [ x          | q | k | v ]   x = E[t], the plain embedding row
    parallel: [ x + mlp(x) | q | k | v ]   the MLP reads only x, so its residual sum is token-local

q, k and v are the projections' outputs before RoPE, in each family's own column layout (NeoX's
per-head interleave, Falcon's grouped kv, Phi-3's fused qkv), with per-head q/k norms applied.

The table is stored as two blocks of columns, `residual` (V, D) and `qkv` (V, W - D), so that a
tied LM head reads the residual block as an ordinary contiguous weight (a strided view into one
wide table made the LM head's matmul up to a tenth slower on CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.arch.base import Parts, embed_scale, scale_in
from firstlayer.dims import model_dims

# Rows per chunk: the work buffers stay a few MB even for 256k-token vocabularies.
CHUNK_ROWS = 2048
# Built in float32 (or float64 when the model is), whatever the model runs in.
BUILD_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Column:
    module: str  # the projection this slice replaces
    start: int
    stop: int


@dataclass(frozen=True)
class Layout:
    """Which columns of a row feed which module; the first `hidden_size` hold x or x + mlp(x)."""

    hidden_size: int
    is_parallel: bool
    columns: tuple[Column, ...]
    # A fused q/k/v projection's int8 scales: one per row and head (this many columns, the head
    # size), so that no scale spans q, k and v however the family orders them; None where q, k
    # and v are projections of their own, one scale each. Not part of the layout's identity.
    scale_width: int | None = field(default=None, compare=False)

    @property
    def width(self) -> int:
        return self.columns[-1].stop if self.columns else self.hidden_size

    @property
    def qkv_width(self) -> int:
        return self.width - self.hidden_size

    def to_dict(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "first": "x+mlp" if self.is_parallel else "x",
            "width": self.width,
            "columns": [[c.module, c.start, c.stop] for c in self.columns],
            **({} if self.scale_width is None else {"scale_width": self.scale_width}),
        }

    @classmethod
    def from_dict(cls, record: dict) -> Layout:
        columns = tuple(Column(name, start, stop) for name, start, stop in record["columns"])
        return cls(
            record["hidden_size"], record["first"] == "x+mlp", columns, record.get("scale_width")
        )


def table_layout(model: nn.Module, parts: Parts, is_parallel: bool) -> Layout:
    hidden_size = model.get_submodule(parts.embedding).weight.shape[1]
    columns, start = [], hidden_size
    for name in parts.projections:
        width = model.get_submodule(name).weight.shape[0]
        columns.append(Column(name, start, start + width))
        start += width
    scale_width = None
    if len(columns) == 1:  # q, k and v fused into one projection, in the family's own order
        scale_width = model_dims(model.config.to_dict()).head_dim
        assert (start - hidden_size) % scale_width == 0, (start - hidden_size, scale_width)
    return Layout(hidden_size, is_parallel, tuple(columns), scale_width)


class TokenLocal(nn.Module):
    """Layer 0's token-local modules, copied in float32: computes table rows for token ids.

    A copy, so the caller may go on to replace the originals in the model (convert streams rows to
    disk after the model has been patched); the embedding weight is shared, not copied.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: Parts,
        layout: Layout,
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
        scale = embed_scale(embedding)
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
            return x_plain  # unscaled: Gemma's sqrt(D) is applied at run time
        x = x_plain if self.scale is None else x_plain * self.scale
        return x + self.mlp(self.mlp_norm(x))

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
            out = projection(normed)  # (N, width)
            if has_norm:
                # per-head norm: (N, H*Dh) -> (N, H, Dh) -> (N, H*Dh); a full-width one
                # (OLMo 2) is one "head" of H*Dh. Its last gain dimension says which.
                head_dim = next(head_norm.parameters()).shape[-1]
                out = head_norm(out.unflatten(-1, (-1, head_dim))).flatten(-2)
            blocks.append(out)
        rows = torch.cat(blocks, dim=-1)
        assert rows.shape == (len(ids), self.layout.qkv_width), rows.shape
        return rows


BLOCKS = ("residual", "qkv")


def table_chunks(
    token_local: TokenLocal, vocab_size: int, block: str, chunk_rows: int | None = None
) -> Iterator[tuple[int, Tensor]]:
    """(first id, rows of `block`) for the whole vocabulary in order, `chunk_rows` ids at a time."""
    assert block in BLOCKS, block
    rows_of = getattr(token_local, block)
    chunk_rows = chunk_rows or CHUNK_ROWS
    device = token_local.embedding_weight.device
    for start in range(0, vocab_size, chunk_rows):
        ids = torch.arange(start, min(start + chunk_rows, vocab_size), device=device)
        yield start, rows_of(ids)


# The dtypes a table may be stored in, independent of the model's. int8 keeps one float32 scale
# per row for each projection's columns (and for a parallel row's residual block) and is
# dequantized only for the rows a step looks up.
TABLE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
INT8_MAX = 127
# The name of a quantized block's scales: `residual` -> `residual_scale`.
SCALE_SUFFIX = "_scale"


def segments(layout: Layout, block: str) -> tuple[tuple[int, int], ...]:
    """Column ranges of a block that share one int8 scale per row: each projection's columns of
    the qkv block (q, k, v), each head's of a fused projection, the whole residual block."""
    if block == "residual":
        return ((0, layout.hidden_size),)
    ranges = []
    for column in layout.columns:
        start, stop = column.start - layout.hidden_size, column.stop - layout.hidden_size
        step = layout.scale_width or stop - start
        ranges += [(i, i + step) for i in range(start, stop, step)]
    return tuple(ranges)


def quantize_int8(rows: Tensor, ranges: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per row and range: (int8 rows (N, W), scales (N, S))."""
    codes, scales = [], []
    for start, stop in ranges:
        part = rows[:, start:stop].float()  # (N, width)
        scale = part.abs().amax(dim=1, keepdim=True) / INT8_MAX  # (N, 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero range
        codes.append(torch.round(part / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1)


def dequantize_int8(
    codes: Tensor, scales: Tensor, ranges: tuple[tuple[int, int], ...], dtype: torch.dtype
) -> Tensor:
    """Rows back from int8: (..., W) codes and (..., S) scales -> (..., W) in `dtype`."""
    parts = [
        codes[..., start:stop].float() * scales[..., i : i + 1]
        for i, (start, stop) in enumerate(ranges)
    ]
    return torch.cat(parts, dim=-1).to(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def block_dtypes(
    table_dtype: torch.dtype, model_dtype: torch.dtype, is_parallel: bool
) -> dict[str, torch.dtype]:
    """The dtype each block is stored in. A serial row's first D columns are the embedding itself,
    which a tied LM head also reads as its weight: they stay in the model's dtype."""
    return {"residual": table_dtype if is_parallel else model_dtype, "qkv": table_dtype}


def encode_rows(
    rows: Tensor, dtype: torch.dtype, ranges: tuple[tuple[int, int], ...]
) -> tuple[Tensor, Tensor | None]:
    """Rows as stored: (rows in `dtype`, None), or for int8 (codes, per-row scales)."""
    if dtype == torch.int8:
        return quantize_int8(rows, ranges)
    return rows.to(dtype), None


def empty_blocks(
    record: dict, layout: Layout, vocab_size: int, model_dtype: torch.dtype, device: Any = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Zero blocks (and int8 scales) of a recorded table, for a loader to fill: every block in
    its stored dtype, so that loading casts nothing, but a serial row's residual block (the
    embedding and tied LM head), which is in the model's."""
    stored = {"residual": record.get("residual_dtype", record["dtype"]), "qkv": record["dtype"]}
    widths = {"residual": layout.hidden_size, "qkv": layout.qkv_width}
    blocks, scales = {}, {}
    for block in BLOCKS:
        keeps_model_dtype = block == "residual" and not layout.is_parallel
        dtype = model_dtype if keeps_model_dtype else TABLE_DTYPES[stored[block]]
        blocks[block] = torch.zeros(vocab_size, widths[block], dtype=dtype, device=device)
        if dtype == torch.int8:
            width = len(segments(layout, block))
            scales[block] = torch.zeros(vocab_size, width, device=device)
    return blocks, scales
