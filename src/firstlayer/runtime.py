"""Run a model from its table: layer 0 reads one row per token, not its q/k/v (and MLP) weights.

    serial:   x = E[t]; x = x + attn(rope(Q[t]), rope(K[t]), V[t]); x = x + mlp(norm(x))
    parallel: x = R[t] + attn(rope(Q[t]), rope(K[t]), V[t]),  R[t] = E[t] + mlp(n2(E[t]))

The patch works inside each family's own layer code: the embedding returns the row's first D
columns and hands its q, k, v columns to layer 0, whose attention norm passes them on to
attention, where every projection becomes a slice of them. RoPE, KV caches, masks, sliding
windows and sandwich norms stay the family's, so generate() works as before. For a parallel block
the MLP returns zeros, its work being already in R[t].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.arch import Parts, adapter_for
from firstlayer.arch.base import embed_scale
from firstlayer.dims import is_parallel, model_dims
from firstlayer.errors import FirstLayerError
from firstlayer.table import Layout, TokenLocal, table_chunks, table_layout

FORMAT_VERSION = 1


class RowHandoff:
    """Carries the rows of the current forward pass from the embedding to layer 0's attention."""

    def __init__(self) -> None:
        self.rows: Tensor | None = None

    def take(self) -> Tensor:
        rows, self.rows = self.rows, None
        if rows is None:
            raise FirstLayerError(
                "layer 0 of a precomputed model ran without table rows: it takes token ids "
                "(input_ids), not inputs_embeds"
            )
        return rows


class TableEmbedding(nn.Module):
    """Replaces the input embedding: looks up table rows, returns their first D columns."""

    def __init__(self, residual: Tensor, qkv: Tensor, handoff: RowHandoff, scale: Tensor | None):
        super().__init__()
        assert residual.shape[0] == qkv.shape[0], (residual.shape, qkv.shape)
        # Parameters that require grad, like every weight of a transformers model: torch's matmul
        # folds (B, T, D) @ W.T into one mm only when W requires grad or the input is contiguous,
        # and the LM head's input (the last position of a prefill) is not. Without it a tied LM
        # head would run as a batched matmul, several times slower.
        self.residual = nn.Parameter(residual)  # (V, D): x or x + mlp(x)
        self.qkv = nn.Parameter(qkv)  # (V, W - D): q, k, v before RoPE
        self.handoff = handoff
        # Gemma's sqrt(D), applied at run time so that the stored x can also serve the LM head.
        self.register_buffer("embed_scale", scale, persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.residual.shape[0]

    def forward(self, input_ids: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.num_embeddings)
        self.handoff.rows = nn.functional.embedding(input_ids, self.qkv)  # (B, T, W - D)
        first = nn.functional.embedding(input_ids, self.residual)  # (B, T, D)
        return first if self.embed_scale is None else first * self.embed_scale.to(first.dtype)

    def table(self) -> Tensor:
        """The whole table, [residual | q | k | v] (a copy, for inspection)."""
        return torch.cat([self.residual, self.qkv], dim=1)

    def extra_repr(self) -> str:
        vocab, hidden = self.residual.shape
        return f"{vocab}, {hidden} + {self.qkv.shape[1]} columns"


class TableRows(nn.Module):
    """Replaces layer 0's attention norm: hands attention the row's q, k, v instead of norm(x)."""

    def __init__(self, handoff: RowHandoff):
        super().__init__()
        self.handoff = handoff

    def forward(self, hidden_states: Tensor) -> Tensor:
        rows = self.handoff.take()
        assert rows.shape[:-1] == hidden_states.shape[:-1], (rows.shape, hidden_states.shape)
        return rows


class Columns(nn.Module):
    """Replaces a q/k/v projection: its precomputed output is a slice of the row's qkv block."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, rows: Tensor) -> Tensor:
        return rows[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop}"


class Zeros(nn.Module):
    """Replaces a parallel block's MLP, whose output is already inside the row's first D columns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: Tensor) -> Tensor:
        # A new tensor each call: Falcon adds attention into the MLP output in place.
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.hidden_size)


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Refuse ids outside the table: a lookup would fail deep in torch or, on GPUs, read garbage."""
    if input_ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} is outside the vocabulary of {vocab_size} tokens (valid ids are "
            f"0..{vocab_size - 1}): check that the tokenizer belongs to this model"
        )


def parts_of(model: nn.Module) -> tuple[Parts, bool]:
    """The adapter's parts for this model and whether its blocks are parallel."""
    config = model.config.to_dict()
    model_dims(config)  # refuses absolute position embeddings with the reason
    parts = adapter_for(config["model_type"]).parts(model)
    return parts, is_parallel(config)


def lm_head_reads_table(model: nn.Module, parts: Parts, parallel: bool) -> bool:
    """Whether the LM head will read the table's x block: serial blocks and a tied LM head."""
    embedding = model.get_submodule(parts.embedding).weight
    lm_head = model.get_submodule(parts.lm_head).weight
    return not parallel and lm_head.data_ptr() == embedding.data_ptr()


def patch(
    model: nn.Module,
    parts: Parts,
    layout: Layout,
    residual: Tensor,
    qkv: Tensor,
    lm_head_from_table: bool,
) -> nn.Module:
    """Swap layer 0's token-local modules for the table, in place; returns the model.

    lm_head_from_table: the LM head reads the table's x block, the same tensor, as a tied head
    reads the embedding; for serial models whose LM head was tied to the input embedding.
    """
    assert residual.shape[1] == layout.hidden_size, (residual.shape, layout.hidden_size)
    assert qkv.shape[1] == layout.qkv_width, (qkv.shape, layout.qkv_width)
    embedding = model.get_submodule(parts.embedding)
    handoff = RowHandoff()
    table = TableEmbedding(residual, qkv, handoff, embed_scale(embedding))
    model.set_submodule(parts.embedding, table)
    model.set_submodule(parts.attn_norm, TableRows(handoff))
    for column in layout.columns:
        start, stop = column.start - layout.hidden_size, column.stop - layout.hidden_size
        model.set_submodule(column.module, Columns(start, stop))
    for name in parts.head_norms.values():
        model.set_submodule(name, nn.Identity())
    if layout.is_parallel:
        if parts.mlp_norm is not None:
            model.set_submodule(parts.mlp_norm, nn.Identity())
        model.set_submodule(parts.mlp, Zeros(layout.hidden_size))
    if lm_head_from_table:
        assert not layout.is_parallel, "a parallel row's first columns hold x + mlp(x), not x"
        model.get_submodule(parts.lm_head).weight = table.residual
    # The tie is ours now: no re-tie by transformers may point the LM head anywhere else.
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = {}
    model.register_forward_pre_hook(refuse_embeddings_input, with_kwargs=True)
    return model


def refuse_embeddings_input(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    for name in ("inputs_embeds", "token_type_ids"):
        if kwargs.get(name) is not None:
            raise FirstLayerError(
                f"a precomputed model takes token ids only, not {name}: its table replaces the "
                "input embedding, so soft prompts or merged multimodal embeddings cannot pass "
                "through layer 0; run the original model for those"
            )


def firstlayer_record(
    model: nn.Module,
    parts: Parts,
    layout: Layout,
    lm_head_from_table: bool,
    table_dtype: torch.dtype,
) -> dict:
    """The `firstlayer` section of a precomputed model's config."""
    return {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "architecture": "parallel" if layout.is_parallel else "serial",
        "table": {
            "module": parts.embedding,
            **layout.to_dict(),
            "dtype": str(table_dtype).removeprefix("torch."),
        },
        # Serial models with a tied LM head read the table's x block: one copy of E on disk.
        "lm_head": {"module": parts.lm_head, "reads_table": lm_head_from_table},
        "eliminated": list(parts.eliminated(layout.is_parallel)),
    }


def plan(model: nn.Module) -> tuple[Parts, Layout, bool]:
    """What precompute and convert do to a model: its parts, the table layout, and whether the
    LM head will read the table's x block. Refuses a model that is precomputed already."""
    if getattr(model.config, "firstlayer", None):
        raise FirstLayerError("this model is precomputed already")
    parts, parallel = parts_of(model)
    layout = table_layout(model, parts, parallel)
    return parts, layout, lm_head_reads_table(model, parts, parallel)


def precompute(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Replace a loaded causal LM's input embedding with the precomputed table, in place.

    The table is computed in float32 (float64 for a float64 model) from the model's own weights
    and stored in `dtype` (default: the embedding's dtype). Layer 0's q/k/v weights and its
    attention norm (for parallel blocks also its MLP and MLP norm) are dropped. Returns the model.
    `progress(done_rows, total_rows)` is called after each chunk.
    """
    parts, layout, lm_head_from_table = plan(model)
    token_local = TokenLocal(model, parts, layout)
    vocab_size, device = token_local.embedding_weight.shape[0], token_local.embedding_weight.device
    table_dtype = dtype or token_local.embedding_weight.dtype
    blocks = {
        "residual": torch.empty(vocab_size, layout.hidden_size, dtype=table_dtype, device=device),
        "qkv": torch.empty(vocab_size, layout.qkv_width, dtype=table_dtype, device=device),
    }
    for index, (name, block) in enumerate(blocks.items()):
        for start, rows in table_chunks(token_local, vocab_size, name):
            block[start : start + len(rows)] = rows
            if progress:
                progress(index * vocab_size + start + len(rows), 2 * vocab_size)
    del token_local
    model.config.firstlayer = firstlayer_record(
        model, parts, layout, lm_head_from_table, table_dtype
    )
    return patch(model, parts, layout, blocks["residual"], blocks["qkv"], lm_head_from_table)
