"""How the table is stored: its dtypes, int8 codes with per-row scales, and empty blocks for a
loader to fill."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from firstlayer.table.layout import BLOCKS, TableLayout, segments

# The dtypes a table may be stored in, independent of the model's. int8 keeps one float32 scale
# per row for each segment (`layout.segments`) and is dequantized only for the rows looked up.
TABLE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
INT8_MAX = 127


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def column_segments(ranges: tuple[tuple[int, int], ...], device: Any = None) -> Tensor:
    """Each column's segment (W,): which of its row's int8 scales it takes."""
    segment = torch.empty(ranges[-1][1] if ranges else 0, dtype=torch.long, device=device)
    for index, (start, stop) in enumerate(ranges):
        segment[start:stop] = index
    return segment


def dequantize_int8(codes: Tensor, scales: Tensor, column_segment: Tensor) -> Tensor:
    """int8 rows back in float32: (..., W) codes times their row's (..., S) scale of each
    column's segment."""
    return codes.float() * scales[..., column_segment]


def encode_rows(
    rows: Tensor, dtype: torch.dtype, ranges: tuple[tuple[int, int], ...]
) -> tuple[Tensor, Tensor | None]:
    """Rows as stored: (rows in `dtype`, None), or for int8 (codes, per-row scales)."""
    if dtype == torch.int8:
        return quantize_int8(rows, ranges)
    return rows.to(dtype), None


def block_dtypes(
    table_dtype: torch.dtype, model_dtype: torch.dtype, is_parallel: bool
) -> dict[str, torch.dtype]:
    """The dtype each block is stored in. A serial row's first D columns are the embedding itself,
    which a tied LM head also reads as its weight: they stay in the model's dtype."""
    return {"residual": table_dtype if is_parallel else model_dtype, "qkv": table_dtype}


def empty_blocks(
    record: dict, layout: TableLayout, vocab_size: int, model_dtype: torch.dtype, device: Any = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Zero blocks (and int8 scales) of a recorded table, for a loader to fill: every block in
    its stored dtype, so that loading casts nothing, but a serial row's residual block (the
    embedding and tied LM head), which is in the model's."""
    stored = {"residual": record.get("residual_dtype", record["dtype"]), "qkv": record["dtype"]}
    blocks, scales = {}, {}
    for block in BLOCKS:
        keeps_model_dtype = block == "residual" and not layout.is_parallel
        dtype = model_dtype if keeps_model_dtype else TABLE_DTYPES[stored[block]]
        width = layout.block_width(block)
        blocks[block] = torch.zeros(vocab_size, width, dtype=dtype, device=device)
        if dtype == torch.int8:
            count = len(segments(layout, block))
            scales[block] = torch.zeros(vocab_size, count, device=device)
    return blocks, scales
