"""The table's layout (arXiv 2402.13388, sections "parallel" and "serial"): which columns of a
row hold what. No torch.

A row holds, for one token id, everything layer 0 computes from that token alone:

    serial:   [ x          | q | k | v ]   x = E[t], the plain embedding row
    parallel: [ x + mlp(x) | q | k | v ]   the MLP reads only x, so its residual sum is token-local

q, k and v are the projections' outputs before RoPE, in each family's own column layout (NeoX's
per-head interleave, Falcon's grouped kv, Phi-3's fused qkv): a parallel block's with its q/k
norms applied, a serial block's before them (its model runs them, so that an adapter's change to
q or k enters before the norm, as in the original).

The table is stored as two blocks of columns, `residual` (V, D) and `qkv` (V, W - D), so that a
tied LM head reads the residual block as an ordinary contiguous weight (a strided view into one
wide table is a slower matmul).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from firstlayer.analysis.dims import model_dims
from firstlayer.families import Parts, family_config

if TYPE_CHECKING:
    from torch import nn

BLOCKS = ("residual", "qkv")
# The name of an int8 block's scales: `residual` -> `residual_scale`.
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class Column:
    module: str  # the projection this slice replaces
    start: int
    stop: int


@dataclass(frozen=True)
class TableLayout:
    """Which columns of a row feed which module; the first `hidden_size` hold x or x + mlp(x)."""

    hidden_size: int
    is_parallel: bool
    columns: tuple[Column, ...]
    # int8 scales of one row and head (this many columns, the head size): for a fused q/k/v
    # projection, so that no scale spans q, k and v however the family orders them; for q and k
    # stored before the norm a serial model runs on them (`Parts.run_head_norms`), so that a
    # head the norm scales up is not quantized on the scale of a larger one. None where q, k and
    # v take one scale each. Not part of the layout's identity.
    scale_width: int | None = field(default=None, compare=False)

    @property
    def width(self) -> int:
        return self.columns[-1].stop if self.columns else self.hidden_size

    @property
    def qkv_width(self) -> int:
        return self.width - self.hidden_size

    def block_width(self, block: str) -> int:
        return self.hidden_size if block == "residual" else self.qkv_width

    def to_dict(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "first": "x+mlp" if self.is_parallel else "x",
            "width": self.width,
            "columns": [[c.module, c.start, c.stop] for c in self.columns],
            **({} if self.scale_width is None else {"scale_width": self.scale_width}),
        }

    @classmethod
    def from_dict(cls, record: dict) -> TableLayout:
        columns = tuple(Column(name, start, stop) for name, start, stop in record["columns"])
        return cls(
            record["hidden_size"], record["first"] == "x+mlp", columns, record.get("scale_width")
        )


def table_layout(model: nn.Module, parts: Parts, is_parallel: bool) -> TableLayout:
    """The layout of a model's table: its projections' widths, in the order the parts name them."""
    hidden_size = model.get_submodule(parts.embedding).weight.shape[1]
    columns, start = [], hidden_size
    for name in parts.projections:
        width = model.get_submodule(name).weight.shape[0]
        columns.append(Column(name, start, start + width))
        start += width
    scale_width = None
    # q, k and v fused into one projection, in the family's own order; or q and k normed after
    # the table, head by head (or across heads, which per-head scales serve as well)
    if len(columns) == 1 or parts.run_head_norms:
        scale_width = model_dims(family_config(model.config)).head_dim
        assert (start - hidden_size) % scale_width == 0, (start - hidden_size, scale_width)
    return TableLayout(hidden_size, is_parallel, tuple(columns), scale_width)


def segments(layout: TableLayout, block: str) -> tuple[tuple[int, int], ...]:
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
