"""The self-check every conversion runs on what it built: table rows read back as stored (from the
written files, or the blocks in memory) against the original's own layer 0 run on the same token
ids, in float32.

The reference is the family's real modules run as the model runs them, not the code that built
the table: the embedding module, then layer 0's forward with hooks on its projections (and
per-head norms) catching q, k and v as it computes them; for a parallel block, layer 0's output
with attention silenced, which is x + mlp(n2(x)). Each token id is a sequence of one token, so
q and k are caught before RoPE as the table stores them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import Parts
from firstlayer.table.codec import column_segments, dequantize_int8
from firstlayer.table.layout import BLOCKS, TableLayout, segments

# Token ids checked per conversion (the whole vocabulary when it is smaller).
SAMPLE_ROWS = 1024
# Relative tolerance by the coarser of the table's and the model's dtype, against |ref| plus the
# row's mean |ref| (so entries near zero are judged at the row's scale): float32 differs only by
# summation order (chunks of rows against one batch); a reduced precision by its rounding,
# twice (the stored row, and the model's own rounding of Gemma's scaled embedding).
RELATIVE_TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-9,
    # int8 rounds each entry to a step of max|range| / 127 of its row's projection, so small
    # entries of a row with outliers fare worst on this measure. The bound a conversion must meet
    # (`convert --accept-error` publishes one that does not): half a step where a row's max is
    # 32x its mean (docs/measurements.md has what real models measure).
    torch.int8: 2.0**-3,
}


@dataclass(frozen=True)
class SelfCheck:
    rows: int  # token ids checked
    tolerance: float
    max_error: float  # relative, as the tolerance
    worst_id: int
    worst_column: int
    worst_module: str  # what that column holds
    stored: float
    expected: float

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance

    def describe(self) -> str:
        return (
            f"{self.rows:,} table rows read back against the original's layer 0: max relative "
            f"error {self.max_error:.2e} (tolerance {self.tolerance:.0e}) at token id "
            f"{self.worst_id}, column {self.worst_column} ({self.worst_module}): stored "
            f"{self.stored:.6g}, layer 0 gives {self.expected:.6g}"
        )


def sample_ids(vocab_size: int, special_ids: list[int], count: int = SAMPLE_ROWS) -> Tensor:
    """The first and last id, the special tokens, and evenly spread and seeded random ids."""
    if vocab_size <= count:
        return torch.arange(vocab_size)
    chosen = {0, vocab_size - 1} | {i for i in special_ids if 0 <= i < vocab_size}
    chosen |= set(torch.linspace(0, vocab_size - 1, count // 2).long().tolist())
    generator = torch.Generator().manual_seed(0)
    for i in torch.randperm(vocab_size, generator=generator).tolist():
        if len(chosen) >= count:
            break
        chosen.add(i)
    return torch.tensor(sorted(chosen))


def special_token_ids(config: object, tokenizer: object | None) -> list[int]:
    ids = list(getattr(tokenizer, "all_special_ids", None) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


class _Caught(Exception):
    """Stops layer 0 once every projection has been caught."""


class _SilentAttention(nn.Module):
    """Stands in for attention in the parallel pass: contributes nothing."""

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> tuple:
        return torch.zeros_like(hidden_states), None


def layer0_reference(
    model: nn.Module,
    parts: Parts,
    layout: TableLayout,
    embedding_rows: Callable[[Tensor], Tensor],
    ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """(residual, qkv) rows of `ids` in float32, from the model's own embedding module and
    layer 0. Only layer 0's token-local modules need real weights (the rest may be on the meta
    device); `embedding_rows(ids)` gives the embedding's rows in the model's dtype."""
    rows = embedding_rows(ids).detach()  # (N, D), the model's dtype
    embedding = _embedding_of_rows(model, parts, rows)
    with torch.inference_mode():
        x = embedding(torch.arange(len(ids))).float().unsqueeze(1)  # (N, 1, D)
        x = _steps_before_layer0(model, parts, x)
    layer = _float32_layer0(model, parts, layout)
    qkv = _caught_projections(layer, parts, layout, x)
    if not layout.is_parallel:
        return rows.float(), qkv
    layer.set_submodule(_relative(parts.attention, parts), _SilentAttention())
    with torch.inference_mode():
        out = layer(x, **_layer_kwargs(layer, len(ids)))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(len(ids), layout.hidden_size), qkv


def _steps_before_layer0(model: nn.Module, parts: Parts, x: Tensor) -> Tensor:
    """What the base model does to the embedding before layer 0 (Granite's multiplier, BLOOM's
    word_embeddings_layernorm), in float32."""
    if parts.embedding_multiplier is not None:
        x = x * parts.embedding_multiplier
    if parts.embedding_norm is not None:
        x = copy.deepcopy(model.get_submodule(parts.embedding_norm)).float()(x)
    return x


def _relative(name: str, parts: Parts) -> str:
    return name.removeprefix(parts.layer + ".")


def _embedding_of_rows(model: nn.Module, parts: Parts, rows: Tensor) -> nn.Module:
    """The model's embedding module (its class, its scale) holding just `rows`."""
    embedding = model.get_submodule(parts.embedding)
    small = copy.deepcopy(embedding, memo={id(embedding.weight): nn.Parameter(rows)})
    if any(b.is_meta for b in small.buffers()):  # built on the meta device: set Gemma's scale
        small.to_empty(device="cpu")
        model._init_weights(small)
        small.weight = nn.Parameter(rows)
    return small.eval()


def _float32_layer0(model: nn.Module, parts: Parts, layout: TableLayout) -> nn.Module:
    """A float32 copy of layer 0 whose token-local modules hold real weights; every other
    parameter is an empty meta tensor (the passes never run those modules)."""
    layer = model.get_submodule(parts.layer)
    # q/k norms the model runs on the table's columns may run between two projections (OLMo 2
    # norms q before it projects k).
    needed = (*parts.eliminated(layout.is_parallel), *parts.run_head_norms.values())
    kept = {id(p) for name in needed for p in model.get_submodule(name).parameters()}
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for p in layer.parameters()
        if id(p) not in kept
    }
    copied = copy.deepcopy(layer, memo)
    for name in needed:
        copied.get_submodule(_relative(name, parts)).float()
    return copied.eval()


def _layer_kwargs(layer: nn.Module, batch: int) -> dict:
    """What every family's decoder layer accepts for a batch of one-token sequences; attention
    masks and positions are unused up to the projections."""
    offered = {
        "attention_mask": None,
        "alibi": None,
        "position_bias": None,
        "position_ids": torch.zeros(batch, 1, dtype=torch.long),
        "position_embeddings": None,
        "layer_past": None,
        "use_cache": False,
    }
    accepted = inspect.signature(layer.forward).parameters
    return {k: v for k, v in offered.items() if k in accepted}


def _caught_projections(layer: nn.Module, parts: Parts, layout: TableLayout, x: Tensor) -> Tensor:
    """Run layer 0 on x until every projection (or its per-head norm) has produced its output."""
    sources = [parts.head_norms.get(name, name) for name in parts.projections]
    caught: dict[str, Tensor] = {}

    def catch(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            caught[name] = output.reshape(x.shape[0], -1)  # one token each: (N, width)
            if len(caught) == len(sources):
                raise _Caught

        return hook

    handles = [
        layer.get_submodule(_relative(name, parts)).register_forward_hook(catch(name))
        for name in sources
    ]
    try:
        with torch.inference_mode():
            layer(x, **_layer_kwargs(layer, x.shape[0]))
    except _Caught:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(caught) != len(sources):
        raise FirstLayerError(f"layer 0 ran without calling {sorted(set(sources) - set(caught))}")
    qkv = torch.cat([caught[name] for name in sources], dim=-1)
    assert qkv.shape == (x.shape[0], layout.qkv_width), qkv.shape
    return qkv


def stored_rows(
    read: Callable[[str, Tensor], tuple[Tensor, Tensor | None]], ids: Tensor, layout: TableLayout
) -> tuple[Tensor, Tensor]:
    """The table's (residual, qkv) rows of `ids` in float32, as stored: `read(block, ids)` gives
    a block's stored rows and, for int8, their scales (dequantized here)."""
    blocks = []
    for block in BLOCKS:
        rows, scales = read(block, ids)
        if scales is not None:
            rows = dequantize_int8(rows, scales, column_segments(segments(layout, block)))
        blocks.append(rows.float())
    return blocks[0], blocks[1]


def compare_rows(
    stored: tuple[Tensor, Tensor],
    expected: tuple[Tensor, Tensor],
    ids: Tensor,
    layout: TableLayout,
    tolerance: float,
) -> SelfCheck:
    """The worst entry of stored against expected rows, relative to |expected| plus the mean
    |expected| of its row."""
    stored_all = torch.cat(stored, dim=1)  # (N, W)
    expected_all = torch.cat(expected, dim=1)
    scale = expected_all.abs() + expected_all.abs().mean(dim=1, keepdim=True)
    error = (stored_all - expected_all).abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    flat = int(torch.argmax(error))
    row, column = divmod(flat, error.shape[1])
    module = next(
        (c.module for c in layout.columns if c.start <= column < c.stop),
        "the residual block",
    )
    return SelfCheck(
        rows=len(ids),
        tolerance=tolerance,
        max_error=float(error[row, column]),
        worst_id=int(ids[row]),
        worst_column=column,
        worst_module=module,
        stored=float(stored_all[row, column]),
        expected=float(expected_all[row, column]),
    )


def tolerance_for(table_dtype: torch.dtype, model_dtype: torch.dtype) -> float:
    return max(RELATIVE_TOLERANCE[table_dtype], RELATIVE_TOLERANCE[model_dtype])


def require(check: SelfCheck) -> SelfCheck:
    if not check.passed:
        raise FirstLayerError(
            f"the conversion's self-check failed: {check.describe()}; nothing was written"
        )
    return check
