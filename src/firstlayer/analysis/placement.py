"""Where the table's bytes go, per table dtype: accelerator memory and host memory, for a table
kept on the accelerator and for one kept in host memory (a step copies its B rows over), and what
a decode step reads with it. Config in, numbers out, no torch: `firstlayer analyze` prints it
under the savings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from firstlayer.analysis.savings import Analysis

# Bytes per entry of each table dtype; int8 adds float32 scales per row: one each for q, k and
# v, or one per head of a fused q/k/v projection and of a serial block's q/k/v whose q and k are
# normed after the table (`table.segments`).
TABLE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
INT8_SCALE_BYTES = 4


@dataclass(frozen=True)
class Placement:
    """Change in bytes against the original model, for one table dtype."""

    table_dtype: str
    table_bytes: int  # what the table adds: q/k/v (and a parallel row's residual) + scales
    on_device: tuple[int, int]  # (accelerator, host): the table in accelerator memory
    on_host: tuple[int, int]  # (accelerator, host): the table in host memory
    stored: int  # the converted folder's weights, bytes (the original's: `WeightBytes.stored`)
    reads_per_step: tuple[int, ...]  # bytes read by one decode step, per batch of the analysis


def placements(analysis: Analysis) -> tuple[Placement, ...]:
    """One Placement per table dtype. The eliminated layer-0 weights leave the accelerator
    either way, at their stored size; a serial row's x columns are the embedding itself (they
    stay in the model's dtype, where the embedding was), a parallel row's replace it unless a
    tied LM head needs it. On a CPU-only machine "host" is what a memory-mapped table costs on
    disk; RAM holds only the rows read."""
    m, weights = analysis.dims, analysis.weight_bytes
    eliminated = weights.freed
    # A parallel model's input embedding is replaced by the residual block, unless it is tied.
    freed_embedding = m.vocab_size * m.d * weights.model_bytes
    embedding_freed = freed_embedding if m.is_parallel and not m.is_tied else 0
    out = []
    for name in TABLE_DTYPE_BYTES:
        row = table_row_bytes(analysis, name)
        table = m.vocab_size * row
        device_change = -eliminated - embedding_freed
        x_columns = 0 if m.is_parallel else m.d * weights.model_bytes
        reads = tuple(
            analysis.bytes_read_per_step(b, True, table_row_bytes=row + x_columns)
            for b in analysis.batches
        )
        stored = weights.stored + table + device_change
        out.append(
            Placement(
                name, table, (table + device_change, 0), (device_change, table), stored, reads
            )
        )
    return tuple(out)


def table_row_bytes(analysis: Analysis, table_dtype: str) -> int:
    """What one table row adds beside the embedding: q/k/v (and a parallel row's x + FFN(x))."""
    m = analysis.dims
    size = TABLE_DTYPE_BYTES[table_dtype]
    scales = INT8_SCALE_BYTES if table_dtype == "int8" else 0
    per_head = m.is_fused_qkv or (not m.is_parallel and m.extras.qk_norm_weights > 0)
    scales_per_row = m.n_heads + 2 * m.n_kv_heads if per_head else 3
    row = (m.q_dim + 2 * m.e) * size + scales_per_row * scales
    return row + (m.d * size + scales if m.is_parallel else 0)


def as_json(analysis: Analysis) -> list[dict[str, Any]]:
    return [asdict(p) for p in placements(analysis)]
