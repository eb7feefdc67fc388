"""Where the table's bytes go, per table dtype: accelerator memory and host memory, for a table
kept on the accelerator and for one kept in host memory (a step copies its B rows over).
Config in, numbers out, no torch: `firstlayer analyze` prints it under the savings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from firstlayer.analysis.savings import Analysis

# Bytes per entry of each table dtype; int8 adds float32 scales per row: one each for q, k and
# v, or one per head of a fused q/k/v projection (`table.segments`).
TABLE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
INT8_SCALE_BYTES = 4
# The model's other weights, as accelerators run them.
MODEL_DTYPE_BYTES = 2


@dataclass(frozen=True)
class Placement:
    """Change in bytes against the original model, for one table dtype."""

    table_dtype: str
    table_bytes: int  # what the table adds: q/k/v (and a parallel row's residual) + scales
    on_device: tuple[int, int]  # (accelerator, host): the table in accelerator memory
    on_host: tuple[int, int]  # (accelerator, host): the table in host memory


def placements(analysis: Analysis, model_bytes: int = MODEL_DTYPE_BYTES) -> tuple[Placement, ...]:
    """One Placement per table dtype. The eliminated layer-0 weights leave the accelerator
    either way; a serial row's x columns are the embedding itself (they stay in the model's
    dtype, where the embedding was), a parallel row's replace it unless a tied LM head needs it.
    On a CPU-only machine "host" is what a memory-mapped table costs on disk; RAM holds only
    the rows read."""
    m = analysis.dims
    qkv_width = m.q_dim + 2 * m.e
    eliminated = analysis.memory.decrease * model_bytes
    # A parallel model's input embedding is replaced by the residual block, unless it is tied.
    embedding_freed = m.vocab_size * m.d * model_bytes if m.is_parallel and not m.is_tied else 0
    out = []
    for name, size in TABLE_DTYPE_BYTES.items():
        scales = INT8_SCALE_BYTES if name == "int8" else 0
        scales_per_row = m.n_heads + 2 * m.n_kv_heads if m.is_fused_qkv else 3
        table = m.vocab_size * (qkv_width * size + scales_per_row * scales)
        if m.is_parallel:
            table += m.vocab_size * (m.d * size + scales)
        device_change = -eliminated - embedding_freed
        out.append(Placement(name, table, (table + device_change, 0), (device_change, table)))
    return tuple(out)


def as_json(analysis: Analysis) -> list[dict[str, Any]]:
    return [asdict(p) for p in placements(analysis)]
