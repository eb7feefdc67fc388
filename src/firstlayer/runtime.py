"""Run a model from its table: layer 0 reads one row per token, not its q/k/v (and MLP) weights.

    serial:   x = E[t]; x = x + attn(rope(Q[t]), rope(K[t]), V[t]); x = x + mlp(norm(x))
    parallel: x = R[t] + attn(rope(Q[t]), rope(K[t]), V[t]),  R[t] = E[t] + mlp(n2(E[t]))

The patch works inside each family's own layer code. The embedding returns the row's first D
columns; the rows' q, k, v columns travel with the call to layer 0's attention as one more keyword
argument of the model call (transformers threads `**kwargs` from the model through every layer
into attention), where they take the place of the normed hidden states and every projection
becomes a slice of them. RoPE, KV caches, masks, sliding windows and sandwich norms stay the
family's, so generate() works as before. For a parallel block the MLP returns zeros, its work
being already in R[t]. Nothing that belongs to one call is kept on a module, so concurrent calls
(threads, asyncio tasks run in threads) cannot exchange rows, and torch.compile traces it all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.arch import Parts, adapter_for
from firstlayer.arch.base import embed_scale, scale_in, threads_kwargs_to_attention
from firstlayer.dims import is_parallel, model_dims
from firstlayer.errors import FirstLayerError
from firstlayer.safetensors_io import MappedFile
from firstlayer.table import (
    BLOCKS,
    SCALE_SUFFIX,
    Layout,
    TokenLocal,
    block_dtypes,
    dequantize_int8,
    dtype_name,
    encode_rows,
    segments,
    table_chunks,
    table_layout,
)

# Format 3 added int8 tables (with `*_scale` blocks), format 4 gives a fused q/k/v projection a
# scale per head (`scale_width`) instead of one for all three: format 3 would be misread, and is
# refused. A folder whose table is not int8 is written as format 2, which it still is, so that
# earlier readers keep reading it.
FORMAT_VERSION = 4
READABLE_FORMATS = (2, 4)
# The keyword under which a call's q/k/v rows travel from the model call to layer 0's attention.
ROWS_KWARG = "firstlayer_rows"
# Where the installed transformers does not hand the model's kwargs to layer 0's attention
# (Falcon; GPT-J in 5.19) the rows travel in a context variable instead: one value per
# thread and per asyncio task, set for one model call.
# torch.compile cannot trace it and breaks the graph there; the kwargs route has no break.
_CALL_ROWS: ContextVar[Tensor | None] = ContextVar(ROWS_KWARG, default=None)


class TableEmbedding(nn.Module):
    """Replaces the input embedding: looks up table rows, returns their first D columns.

    The blocks may be stored in another dtype than the model runs in (float16, bfloat16, or int8
    with per-row scales), and the blocks named in `host_blocks` (a loaded model's memory-mapped
    ones) stay where they are when the model moves or changes dtype: each call converts only
    the rows it looks up and copies them to the model's device.
    """

    def __init__(
        self,
        residual: Tensor,
        qkv: Tensor,
        scale: float | None,
        layout: Layout,
        scales: dict[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        assert residual.shape[0] == qkv.shape[0], (residual.shape, qkv.shape)
        # Parameters that require grad, like every weight of a transformers model: torch's matmul
        # folds (B, T, D) @ W.T into one mm only when W requires grad or the input is contiguous,
        # and the LM head's input (the last position of a prefill) is not. Without it a tied LM
        # head would run as a batched matmul, several times slower. (int8 cannot require grad.)
        self.residual = nn.Parameter(residual, requires_grad=residual.is_floating_point())
        self.qkv = nn.Parameter(qkv, requires_grad=qkv.is_floating_point())  # (V, W - D)
        for block in BLOCKS:  # int8 blocks: (V, S) float32 scales, one per row and range
            scale_of = (scales or {}).get(block)
            self.register_parameter(
                block + SCALE_SUFFIX,
                None if scale_of is None else nn.Parameter(scale_of, requires_grad=False),
            )
        self.ranges = {block: segments(layout, block) for block in BLOCKS}
        # Gemma's sqrt(D), applied at run time so that the stored x can also serve the LM head.
        self.scale = scale
        # Where rows go and in what dtype: the model's, followed through .to() (see _apply).
        self.dtype = dtype or (residual.dtype if residual.is_floating_point() else torch.float32)
        self.device = residual.device
        self.host_blocks: frozenset[str] = frozenset()
        self.files: tuple[MappedFile, ...] = ()  # the files mapped blocks read from

    @property
    def num_embeddings(self) -> int:
        return self.residual.shape[0]

    @property
    def weight(self) -> Tensor:
        """The residual block, for code that asks the input embedding for its dtype or device."""
        return self.residual

    def forward(self, input_ids: Tensor) -> Tensor:
        first = self.lookup("residual", input_ids)  # (B, T, D)
        return first if self.scale is None else first * scale_in(self.scale, first.dtype)

    def rows(self, input_ids: Tensor) -> Tensor:
        """The q, k, v columns of the tokens' rows: (B, T, W - D)."""
        return self.lookup("qkv", input_ids)

    def lookup(self, block: str, input_ids: Tensor) -> Tensor:
        """A block's rows for token ids, in the model's dtype on the ids' device."""
        stored = getattr(self, block)
        scales = getattr(self, block + SCALE_SUFFIX)
        if scales is None and stored.dtype == self.dtype and stored.device == input_ids.device:
            return nn.functional.embedding(input_ids, stored)
        ids = input_ids.to(stored.device)
        if scales is None:
            rows = nn.functional.embedding(ids, stored).to(self.dtype)
        else:
            rows = dequantize_int8(stored[ids], scales[ids], self.ranges[block], self.dtype)
        if rows.device == input_ids.device:
            return rows
        # A table kept in host memory: only these B x T rows cross to the accelerator.
        if input_ids.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(input_ids.device, non_blocking=True)

    def check_files(self) -> None:
        """Refuse to read a mapped block whose file was truncated or replaced since loading."""
        for file in self.files:
            file.check()

    def _apply(self, fn: Callable, recurse: bool = True) -> TableEmbedding:
        # .to(), .half(), .cuda() reach every module through _apply: follow the model's dtype
        # and device; host-kept blocks stay where they are, int8 scales stay float32 and move.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        self.dtype, self.device = probe.dtype, probe.device
        held = {
            name: p
            for name, p in self._parameters.items()
            if p is not None and (name in self.host_blocks or name.endswith(SCALE_SUFFIX))
        }
        self._parameters.update(dict.fromkeys(held))
        super()._apply(fn, recurse)
        for name, p in held.items():
            if name not in self.host_blocks:
                p = nn.Parameter(p.to(self.device), requires_grad=False)
            self._parameters[name] = p
        return self

    def table(self) -> Tensor:
        """The whole table, [residual | q | k | v] in the model's dtype (a copy, to inspect)."""
        ids = torch.arange(self.num_embeddings, device=self.residual.device)
        return torch.cat([self.lookup(block, ids) for block in BLOCKS], dim=1)

    def extra_repr(self) -> str:
        vocab, hidden = self.residual.shape
        return f"{vocab}, {hidden} + {self.qkv.shape[1]} columns, qkv in {self.qkv.dtype}"


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


def refuse_embeddings_input(kwargs: dict[str, Any]) -> None:
    for name in ("inputs_embeds", "token_type_ids"):
        if kwargs.get(name) is not None:
            raise FirstLayerError(
                f"a precomputed model takes token ids only, not {name}: its table replaces the "
                "input embedding, so soft prompts or merged multimodal embeddings cannot pass "
                "through layer 0; run the original model for those"
            )


class RowsFromTable:
    """Forward pre-hook of the base model: looks up the call's q/k/v rows and sends them along
    with the call, as a keyword argument or (where transformers does not thread kwargs that far)
    in the call's context."""

    def __init__(self, table: TableEmbedding, through_kwargs: bool):
        self.table = table
        self.through_kwargs = through_kwargs

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        refuse_embeddings_input(kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return args, kwargs  # the family's own forward says what is missing
        if not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.table.num_embeddings)
            self.table.check_files()
        rows = self.table.rows(input_ids)  # (B, T, W - D)
        if self.through_kwargs:
            return args, {**kwargs, ROWS_KWARG: rows}
        _CALL_ROWS.set(rows)
        return args, kwargs


def forget_call_rows(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook of the base model on the context route, run even when the call raises: the
    rows end with the call that looked them up."""
    _CALL_ROWS.set(None)


def rows_into_attention(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Forward pre-hook of layer 0's attention: the call's rows replace its input, norm(x)."""
    rows = kwargs.pop(ROWS_KWARG, None)
    if rows is None:
        rows = _CALL_ROWS.get()
    if rows is None:
        raise FirstLayerError(
            "layer 0 of a precomputed model ran without table rows: call the model (or its base "
            "model) with input_ids, not one of its layers"
        )
    if "hidden_states" in kwargs:
        hidden_states = kwargs["hidden_states"]
        kwargs = {**kwargs, "hidden_states": rows}
    else:
        hidden_states, args = args[0], (rows, *args[1:])
    assert rows.shape[:-1] == hidden_states.shape[:-1], (rows.shape, hidden_states.shape)
    return args, kwargs


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


def family_config(config: Any) -> dict[str, Any]:
    """A config as a dict with its family's own model type, also for a precomputed model's
    config (whose `model_type` is firstlayer's name for it)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    record = values.get("firstlayer")
    return {**values, "model_type": record["model_type"]} if record else values


def parts_of(model: nn.Module) -> tuple[Parts, bool]:
    """The adapter's parts for this model and whether its blocks are parallel."""
    config = family_config(model.config)
    model_dims(config)  # refuses absolute position embeddings with the reason
    parts = adapter_for(config["model_type"]).parts(model)
    return parts, is_parallel(config)


def lm_head_reads_table(model: nn.Module, parts: Parts, parallel: bool) -> bool:
    """Whether the LM head will read the table's x block: serial blocks and a tied LM head."""
    embedding = model.get_submodule(parts.embedding).weight
    lm_head = model.get_submodule(parts.lm_head).weight
    # The same Parameter when tied (also on the meta device, where every data_ptr is 0).
    return not parallel and (
        lm_head is embedding or lm_head.data_ptr() == embedding.data_ptr() != 0
    )


def patch(
    model: nn.Module,
    parts: Parts,
    layout: Layout,
    residual: Tensor,
    qkv: Tensor,
    lm_head_from_table: bool,
    scales: dict[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Swap layer 0's token-local modules for the table, in place; returns the model.

    lm_head_from_table: the LM head reads the table's x block, the same tensor, as a tied head
    reads the embedding; for serial models whose LM head was tied to the input embedding.
    scales: the per-row scales of int8 blocks; dtype: the model's (default: the residual's).
    """
    assert residual.shape[1] == layout.hidden_size, (residual.shape, layout.hidden_size)
    assert qkv.shape[1] == layout.qkv_width, (qkv.shape, layout.qkv_width)
    scale = embed_scale(model.get_submodule(parts.embedding))
    table = TableEmbedding(residual, qkv, scale, layout, scales, dtype)
    model.set_submodule(parts.embedding, table)
    # The attention norm's work is in the rows, which replace its output on the way in.
    if parts.attn_norm is not None:
        model.set_submodule(parts.attn_norm, nn.Identity())
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
    base_model = model.get_submodule(parts.base_model)
    through_kwargs = threads_kwargs_to_attention(model, parts)
    base_model.register_forward_pre_hook(RowsFromTable(table, through_kwargs), with_kwargs=True)
    if not through_kwargs:
        base_model.register_forward_hook(forget_call_rows, with_kwargs=True, always_call=True)
    attention = model.get_submodule(parts.attention)
    attention.register_forward_pre_hook(rows_into_attention, with_kwargs=True)
    # Refused at the top as well: the base model may never see inputs_embeds (a merge upstream).
    model.register_forward_pre_hook(refuse_embeddings_at_top, with_kwargs=True)
    return model


def refuse_embeddings_at_top(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    refuse_embeddings_input(kwargs)


def firstlayer_record(
    model: nn.Module,
    parts: Parts,
    layout: Layout,
    lm_head_from_table: bool,
    table_dtype: torch.dtype,
    residual_dtype: torch.dtype | None = None,
) -> dict:
    """The `firstlayer` section of a precomputed model's config. `table_dtype` is the qkv
    block's, `residual_dtype` the residual block's (default the same)."""
    return {
        "format_version": FORMAT_VERSION if table_dtype == torch.int8 else 2,
        "model_type": model.config.model_type,
        "architecture": "parallel" if layout.is_parallel else "serial",
        "table": {
            "module": parts.embedding,
            **layout.to_dict(),
            "dtype": dtype_name(table_dtype),
            "residual_dtype": dtype_name(residual_dtype or table_dtype),
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
    """Replace a loaded causal LM's input embedding with the precomputed table, in place; the
    model keeps its class (`firstlayer.precompute` also makes it a precomputed class).

    The table is computed in float32 (float64 for a float64 model) from the model's own weights
    and stored in `dtype` (default: the embedding's dtype; int8 keeps per-row scales), but for a
    serial row's first D columns, the embedding itself, which stay in the model's dtype. Layer
    0's q/k/v weights and its attention norm (for parallel blocks also its MLP and MLP norm) are
    dropped. Returns the model. `progress(done_rows, total_rows)` is called after each chunk.
    """
    parts, layout, lm_head_from_table = plan(model)
    token_local = TokenLocal(model, parts, layout)
    vocab_size, device = token_local.embedding_weight.shape[0], token_local.embedding_weight.device
    model_dtype = token_local.embedding_weight.dtype
    table_dtype = dtype or model_dtype
    dtypes = block_dtypes(table_dtype, model_dtype, layout.is_parallel)
    widths = {"residual": layout.hidden_size, "qkv": layout.qkv_width}
    blocks, scales = {}, {}
    for index, name in enumerate(BLOCKS):
        ranges = segments(layout, name)
        blocks[name] = torch.empty(vocab_size, widths[name], dtype=dtypes[name], device=device)
        if dtypes[name] == torch.int8:
            scales[name] = torch.empty(vocab_size, len(ranges), device=device)
        for start, rows in table_chunks(token_local, vocab_size, name):
            stored, scale = encode_rows(rows, dtypes[name], ranges)
            blocks[name][start : start + len(rows)] = stored
            if scale is not None:
                scales[name][start : start + len(rows)] = scale
            if progress:
                progress(index * vocab_size + start + len(rows), 2 * vocab_size)
    del token_local
    model.config.firstlayer = firstlayer_record(
        model, parts, layout, lm_head_from_table, table_dtype, dtypes["residual"]
    )
    return patch(
        model,
        parts,
        layout,
        blocks["residual"],
        blocks["qkv"],
        lm_head_from_table,
        scales,
        model_dtype,
    )
