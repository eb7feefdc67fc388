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

A folder converted with layer 0 kept (`keep_layer0`) also takes inputs_embeds: positions fed by
an embedding rather than a token id get the rows layer 0 computes from them, with its own norm
and q/k/v weights (`KeptLayer0`); token positions still read the table.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import Parts, family_config, family_of, is_parallel
from firstlayer.folder import head_norms_in_table, kept_layer0
from firstlayer.safetensors_io import MappedFile
from firstlayer.table.build import scale_in
from firstlayer.table.codec import column_segments
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, TableLayout, segments
from firstlayer.table.lookup import HostStaging, gather_rows

# The keyword under which a call's q/k/v rows travel from the model call to layer 0's attention.
ROWS_KWARG = "firstlayer_rows"
# Where the installed transformers does not hand the model's kwargs to layer 0's attention
# (Falcon; GPT-J in 5.19) the rows travel in a context variable instead: one value per
# thread and per asyncio task, set for one model call.
# torch.compile cannot trace it and breaks the graph there; the kwargs route has no break.
_CALL_ROWS: ContextVar[Tensor | None] = ContextVar(ROWS_KWARG, default=None)
# The keyword under which a multimodal model's prompt ids travel from the top model, which
# embeds them and scatters image features in, to its language model, called with inputs_embeds
# only: positions whose input is their id's embedding row read the table.
IDS_KWARG = "firstlayer_ids"


class TableEmbedding(nn.Module):
    """Replaces the input embedding: looks up table rows, returns their first D columns.

    The blocks may be stored in another dtype than the model runs in (float16, bfloat16, or int8
    with per-row scales), and the blocks named in `host_blocks` (kept in host memory, or mapped
    from the folder's file) stay where they are when the model moves or changes dtype: each call
    converts only the rows it looks up and copies them to the model's device
    (`table.lookup.gather_rows`, the lookup the vLLM plugin uses too).
    """

    def __init__(
        self,
        residual: Tensor,
        qkv: Tensor,
        scale: float | None,
        layout: TableLayout,
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
        for block in BLOCKS:  # int8 blocks: (V, S) float32 scales, one per row and segment
            scale_of = (scales or {}).get(block)
            self.register_parameter(
                block + SCALE_SUFFIX,
                None if scale_of is None else nn.Parameter(scale_of, requires_grad=False),
            )
        # An embedding scale (Gemma's sqrt(D)), applied at run time so that the stored x can also
        # serve the LM head.
        self.scale = scale
        # The dtype rows are converted to: the model's, followed through .to() (see _apply). Rows
        # go to the device of the ids they are looked up for.
        self.dtype = dtype or (residual.dtype if residual.is_floating_point() else torch.float32)
        self.attn_norm: nn.Module | None = None  # layer 0's, kept for adapters (`patch`)
        self.host_blocks: frozenset[str] = frozenset()
        self.files: tuple[MappedFile, ...] = ()  # the files mapped blocks read from
        self.staging = {block: HostStaging() for block in BLOCKS}
        # Each int8 column's segment, which of its row's scales it takes: derived from the
        # layout, not stored (made on the host, even while the model is built on the meta
        # device), and moved to its scales' device on first use there.
        self.segments = {
            block: column_segments(segments(layout, block), device="cpu")
            if getattr(self, block + SCALE_SUFFIX) is not None
            else None
            for block in BLOCKS
        }

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
        scales, segment = getattr(self, block + SCALE_SUFFIX), self.segments[block]
        if scales is not None and segment.device != scales.device:
            segment = self.segments[block] = segment.to(scales.device)
        stored = getattr(self, block)
        return gather_rows(stored, input_ids, self.dtype, scales, segment, self.staging[block])

    def keep_on_host(self, blocks: dict[str, Tensor], files: tuple[MappedFile, ...] = ()) -> None:
        """Replace blocks (and int8 scales) by these host tensors (mapped from `files`, or copied
        into host memory), which stay where they are when the model moves."""
        for name, tensor in blocks.items():
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        self.host_blocks = frozenset(blocks)
        self.files = files

    def replace_block(self, name: str, tensor: Tensor) -> None:
        """A block's new values (an adapter merged into it), where the old ones were: a host-kept
        block stays on the host, now in process memory."""
        old = getattr(self, name)
        setattr(self, name, nn.Parameter(tensor.to(old.device), requires_grad=False))

    def check_files(self) -> None:
        """Refuse to read a mapped block whose file was truncated or replaced since loading."""
        for file in self.files:
            file.check()

    def _apply(self, fn: Callable, recurse: bool = True) -> TableEmbedding:
        # .to(), .half(), .cuda(), .float() reach every module through _apply. The placement rule:
        # blocks kept on the host (mapped or copied, `host_blocks`) stay where they are, in their
        # stored dtype, with their scales; the other blocks move and cast as every weight does;
        # int8 scales move but stay float32. The rows' dtype follows the model's, read off `fn`
        # on a host probe: the module may have been built on the meta device (from_pretrained),
        # whose tensors cannot be copied, and keeps no device of its own for that reason.
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        held = {
            name: p
            for name, p in self._parameters.items()
            if p is not None and (name in self.host_blocks or name.endswith(SCALE_SUFFIX))
        }
        self._parameters.update(dict.fromkeys(held))
        super()._apply(fn, recurse)
        for name, p in held.items():
            if name not in self.host_blocks:
                p = nn.Parameter(p.to(moved_device(fn, p)), requires_grad=False)
            self._parameters[name] = p
        return self

    def table(self) -> Tensor:
        """The whole table, [residual | q | k | v] in the model's dtype (a copy, to inspect)."""
        ids = torch.arange(self.num_embeddings, device=self.residual.device)
        return torch.cat([self.lookup(block, ids) for block in BLOCKS], dim=1)

    def extra_repr(self) -> str:
        vocab, hidden = self.residual.shape
        return f"{vocab}, {hidden} + {self.qkv.shape[1]} columns, qkv in {self.qkv.dtype}"


def moved_device(fn: Callable, tensor: Tensor) -> torch.device:
    """The device `fn` (what `Module._apply` applies) sends `tensor` to, without copying it."""
    return fn(torch.empty(0, device=tensor.device)).device


class Columns(nn.Module):
    """Replaces a q/k/v projection: its precomputed output is a slice of the row's qkv block.

    `adapter` is the model's `AdapterInput`: an adapter's layer-0 part (`hf.peft.ColumnsLora`)
    reads norm(x) from it. Without `kept` the zero-size `weight` only tells PEFT and accelerate
    the module's device and dtype; with it (a folder converted with layer 0 kept) `weight` and
    `bias` are the projection's own, under the original's names, which positions fed by an
    embedding run (`KeptLayer0`)."""

    def __init__(
        self,
        start: int,
        stop: int,
        adapter: AdapterInput | None = None,
        dtype=None,
        kept: nn.Linear | None = None,
    ):
        super().__init__()
        self.start, self.stop = start, stop
        self.adapter = adapter
        if kept is None:
            self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
            self.bias = None
        else:
            self.weight, self.bias = kept.weight, kept.bias

    def project(self, normed: Tensor) -> Tensor:
        """The kept projection itself, on norm(x)."""
        return nn.functional.linear(normed, self.weight, self.bias)

    @property
    def in_features(self) -> int:
        return self.adapter.hidden_size

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def forward(self, rows: Tensor) -> Tensor:
        return rows[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop}"


class AdapterInput:
    """What an adapter's layer-0 part reads: norm(x), as layer 0's attention norm makes it from
    the input x layer 0 receives (`kind` "attn_norm", the norm the table module keeps), or x
    itself where layer 0 norms only after attention ("x"). None for a parallel block, whose
    rows hold x + mlp(x) and no x. While an adapter asks for it (`requested`), layer 0's
    attention receives [q k v | norm(x)] and each `Columns` keeps reading its own slice.

        serial, with an adapter on layer 0's P in {q, k, v}:  P(n(x)) = T[t] + B·A·n(x)
    """

    def __init__(self, model: nn.Module, table: TableEmbedding, parts: Parts, kind: str | None):
        self.kind = kind
        self.table = table
        self.hidden_size = table.residual.shape[1]
        self.qkv_width = table.qkv.shape[1]
        self.embedding_multiplier = parts.embedding_multiplier
        norm = parts.embedding_norm
        self.embedding_norm = None if norm is None else model.get_submodule(norm)
        self.requested = False

    def __call__(self, x: Tensor) -> Tensor:
        """norm(x) for layer 0's input x."""
        if self.kind == "attn_norm":
            return self.table.attn_norm(x)
        return x

    def for_vocabulary(self) -> Tensor:
        """norm(x) for every token id, (V, D): layer 0's input as the base model makes it (the
        embedding's scale, a multiplier, an embedding norm), then the attention norm."""
        ids = torch.arange(self.table.num_embeddings, device=self.table.residual.device)
        x = self.table(ids)
        if self.embedding_multiplier is not None:
            x = x * self.embedding_multiplier
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self(x)


class KeptLayer0:
    """Layer 0's kept attention norm and q/k/v, for positions fed by an embedding (soft prompts,
    image features) rather than a token id: their rows are what layer 0 computes from their
    input x, cat(P(norm(x)) for P in the table's column order), norm(x) as `AdapterInput` makes
    it for adapters. Token positions keep reading the table."""

    def __init__(self, adapter: AdapterInput, columns: list[Columns]):
        self.adapter = adapter
        self.columns = columns

    def __call__(self, x: Tensor) -> Tensor:
        normed = self.adapter(x)
        return torch.cat([column.project(normed) for column in self.columns], dim=-1)

    def fill(self, call: CallRows, x: Tensor) -> Tensor:
        """The call's rows, those of embedding positions computed from x (layer 0's input)."""
        if call.rows is None:  # no ids: every position is fed by an embedding
            return self(x)
        # One look at the mask (a device sync on an accelerator) spares a step whose every
        # position is a token, a decode step, all of layer 0's projections.
        if not bool(call.embedded.any()):
            return call.rows
        rows = call.rows.clone()
        rows[call.embedded] = self(x[call.embedded]).to(rows.dtype)
        return rows


class CallRows(NamedTuple):
    """A call's rows where some positions are fed by an embedding: the table's rows (None where
    the call has no ids) and which positions (B, T) take layer 0's kept weights instead."""

    rows: Tensor | None
    embedded: Tensor | None


class Zeros(nn.Module):
    """Replaces a parallel block's MLP, whose output is already inside the row's first D columns."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: Tensor) -> Tensor:
        # A new tensor each call: Falcon adds attention into the MLP output in place.
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.hidden_size)


# What the refusal of inputs_embeds names as its fix.
KEEP_LAYER0_FIX = (
    "convert the source with layer 0 kept (`firstlayer convert --keep-layer0`, or "
    "keep_layer0=True), whose positions fed by an embedding run layer 0's own weights"
)


def refuse_embeddings_input(kwargs: dict[str, Any], kept: bool = False) -> None:
    """Refuse token_type_ids, and inputs_embeds unless layer 0's weights were kept."""
    if kwargs.get("token_type_ids") is not None:
        raise FirstLayerError(
            "a precomputed model takes no token_type_ids: its table holds layer 0's output for "
            "the token embedding alone; run the original model for those"
        )
    if kwargs.get("inputs_embeds") is not None and not kept:
        raise FirstLayerError(
            "a precomputed model takes token ids only, not inputs_embeds: its table replaces the "
            "input embedding and layer 0's q/k/v weights, so soft prompts or merged multimodal "
            f"embeddings cannot pass through layer 0; {KEEP_LAYER0_FIX}"
        )


class RowsFromTable:
    """Forward pre-hook of the base model: looks up the call's q/k/v rows and sends them along
    with the call, as a keyword argument or (where transformers does not thread kwargs that far)
    in the call's context."""

    def __init__(self, table: TableEmbedding, through_kwargs: bool, kept: bool = False):
        self.table = table
        self.through_kwargs = through_kwargs
        self.kept = kept  # layer 0's weights are kept: inputs_embeds run them

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        refuse_embeddings_input(kwargs, self.kept)
        prompt_ids = kwargs.pop(IDS_KWARG, None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        rows: Tensor | CallRows
        if embeds is not None and input_ids is None:
            rows = self.split(prompt_ids, embeds)
        elif input_ids is None:
            return args, kwargs  # the family's own forward says what is missing
        else:
            if not torch.compiler.is_compiling():
                refuse_ids_outside_table(input_ids, self.table.num_embeddings)
                self.table.check_files()
            rows = self.table.rows(input_ids)  # (B, T, W - D)
        if self.through_kwargs:
            return args, {**kwargs, ROWS_KWARG: rows}
        _CALL_ROWS.set(rows)
        return args, kwargs

    def split(self, ids: Tensor | None, embeds: Tensor) -> CallRows:
        """Which positions of an embeddings call are tokens: those whose input row is, bit for
        bit, what the table module returns for their id (the multimodal wrapper embeds ids with
        it); the others (image features, soft prompts) and ids outside the vocabulary (image
        placeholders) run layer 0's kept weights. Without ids, every position does."""
        if ids is None or ids.shape != embeds.shape[:-1]:
            return CallRows(None, None)
        inside = (ids >= 0) & (ids < self.table.num_embeddings)
        ids = ids.where(inside, 0)
        embedded = ~inside | (embeds != self.table(ids).to(embeds.dtype)).any(dim=-1)
        return CallRows(self.table.rows(ids), embedded)


def ids_along(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Forward pre-hook of a multimodal model: its prompt ids travel along to the language model
    (`IDS_KWARG`), which the wrapper calls with inputs_embeds only."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        return args, kwargs
    return args, {**kwargs, IDS_KWARG: input_ids}


def forget_call_rows(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook of the base model on the context route, run even when the call raises: the
    rows end with the call that looked them up."""
    _CALL_ROWS.set(None)


class RowsIntoAttention:
    """Forward pre-hook of layer 0's attention: the call's rows replace its input, norm(x) (the
    attention norm is an Identity, so the input is x); while an adapter asks for it, norm(x)
    follows the rows."""

    def __init__(self, adapter: AdapterInput, kept: KeptLayer0 | None = None):
        self.adapter = adapter
        self.kept = kept

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        rows = kwargs.pop(ROWS_KWARG, None)
        if rows is None:
            rows = _CALL_ROWS.get()
        if rows is None:
            raise FirstLayerError(
                "layer 0 of a precomputed model ran without table rows: call the model (or its "
                "base model) with input_ids, not one of its layers"
            )
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if isinstance(rows, CallRows):  # the attention norm is an Identity: this is x
            rows = self.kept.fill(rows, hidden_states)
        assert rows.shape[:-1] == hidden_states.shape[:-1], (rows.shape, hidden_states.shape)
        if self.adapter.requested:  # [q k v | norm(x)]: (B, T, W - D + D)
            rows = torch.cat([rows, self.adapter(hidden_states).to(rows.dtype)], dim=-1)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": rows}
        return (rows, *args[1:]), kwargs


def refuse_ids_outside_table(input_ids: Tensor, vocab_size: int) -> None:
    """Refuse ids outside the table, where a lookup would fail deep in torch. On an accelerator
    the check is queued as a device-side assertion (as the original's embedding checks its
    ids), so that no step waits for the device to answer it."""
    if input_ids.numel() == 0:
        return
    if input_ids.device.type != "cpu":
        inside = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(inside, f"a token id is outside the vocabulary of {vocab_size}")
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise FirstLayerError(
            f"token id {bad} is outside the vocabulary of {vocab_size} tokens (valid ids are "
            f"0..{vocab_size - 1}): check that the tokenizer belongs to this model"
        )


def parts_of(model: nn.Module, record: dict | None = None) -> tuple[Parts, bool]:
    """Where layer 0's token-local modules are in this model, and whether its blocks are
    parallel; refuses a family the method does not apply to, or that is not declared. Whether
    the q/k norms are in the table or run at run time (`Parts.run_head_norms`) is what `record`
    says (default: the model's own; for a model not precomputed, how a conversion writes it)."""
    config = family_config(model.config)
    parts = family_of(config["model_type"]).parts(model)
    parallel = is_parallel(config)
    if record is None:
        record = getattr(model.config, "firstlayer", None)
    if not head_norms_in_table(record, parallel):
        parts = parts.head_norms_at_run_time()
    return parts, parallel


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
    layout: TableLayout,
    residual: Tensor,
    qkv: Tensor,
    lm_head_from_table: bool,
    scales: dict[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
    keep_attn_norm: bool = False,
    adapter_input: str | None = None,
    keep_layer0: bool = False,
) -> nn.Module:
    """Swap layer 0's token-local modules for the table, in place; returns the model.

    lm_head_from_table: the LM head reads the table's x block, the same tensor, as a tied head
    reads the embedding; for serial models whose LM head was tied to the input embedding.
    scales: the per-row scales of int8 blocks; dtype: the model's (default: the residual's).
    keep_attn_norm: the table module keeps layer 0's attention norm (`attn_norm`), which only an
    adapter's layer-0 part runs; adapter_input: "x" for a serial layer 0 without an attention norm
    (see `AdapterInput`; None where a folder records neither). keep_layer0: the q/k/v
    projections keep their weights (`Columns`), which positions fed by an embedding run
    (`KeptLayer0`); a serial layer 0 only.
    """
    assert residual.shape[1] == layout.hidden_size, (residual.shape, layout.hidden_size)
    assert qkv.shape[1] == layout.qkv_width, (qkv.shape, layout.qkv_width)
    table = TableEmbedding(residual, qkv, parts.embedding_scale, layout, scales, dtype)
    if keep_attn_norm:
        table.attn_norm = model.get_submodule(parts.attn_norm)
    kind = None if layout.is_parallel else ("attn_norm" if keep_attn_norm else adapter_input)
    adapter = AdapterInput(model, table, parts, kind)
    model.set_submodule(parts.embedding, table)
    # The attention norm's work is in the rows, which replace its output on the way in.
    if parts.attn_norm is not None:
        model.set_submodule(parts.attn_norm, nn.Identity())
    columns = []
    for column in layout.columns:
        start, stop = column.start - layout.hidden_size, column.stop - layout.hidden_size
        own = model.get_submodule(column.module) if keep_layer0 else None
        columns.append(Columns(start, stop, adapter, table.dtype, own))
        model.set_submodule(column.module, columns[-1])
    kept = None
    if keep_layer0:
        assert not layout.is_parallel and kind is not None and not parts.head_norms, parts
        kept = KeptLayer0(adapter, columns)
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
    rows_from_table = RowsFromTable(table, through_kwargs, keep_layer0)
    base_model.register_forward_pre_hook(rows_from_table, with_kwargs=True)
    if not through_kwargs:
        base_model.register_forward_hook(forget_call_rows, with_kwargs=True, always_call=True)
    attention = model.get_submodule(parts.attention)
    attention.register_forward_pre_hook(RowsIntoAttention(adapter, kept), with_kwargs=True)
    # Refused at the top as well: the base model may never see inputs_embeds (a merge upstream).
    if family_of(family_config(model.config)["model_type"]).is_multimodal:
        # Its top model takes token_type_ids (Gemma 3's image mask) and embeds the ids itself.
        model.register_forward_pre_hook(ids_along, with_kwargs=True)
    else:
        refuse_at_top = functools.partial(refuse_embeddings_at_top, kept=keep_layer0)
        model.register_forward_pre_hook(refuse_at_top, with_kwargs=True)
    return model


def patch_as_recorded(
    model: nn.Module,
    parts: Parts,
    layout: TableLayout,
    record: dict,
    blocks: dict[str, Tensor],
    scales: dict[str, Tensor] | None,
    dtype: torch.dtype,
) -> nn.Module:
    """`patch` with what a folder's record says: whether the LM head reads the table, whether
    the table module keeps layer 0's attention norm, what an adapter's layer-0 part reads."""
    adapter_input = record.get("adapter_input")
    return patch(
        model,
        parts,
        layout,
        blocks["residual"],
        blocks["qkv"],
        bool(record["lm_head"]["reads_table"]),
        scales,
        dtype,
        keep_attn_norm=adapter_input == "attn_norm",
        adapter_input=adapter_input,
        keep_layer0=bool(kept_layer0(record)),
    )


def refuse_embeddings_at_top(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], kept: bool = False
) -> None:
    refuse_embeddings_input(kwargs, kept)


def threads_kwargs_to_attention(model: nn.Module, parts: Parts) -> bool:
    """Whether this transformers release hands the model call's keyword arguments through to
    layer 0's attention: the base model calls its layers with `**kwargs`, and layer 0 calls its
    attention with `**kwargs`. Read from the installed code, since releases differ (GPT-J has it
    in 5.24, not in 5.19; Falcon in neither)."""
    attention_attr = parts.attention.removeprefix(parts.layer + ".")
    base_model = model.get_submodule(parts.base_model)
    layer = model.get_submodule(parts.layer)
    calls_layers = _calls_with_kwargs(type(base_model).forward, lambda f: isinstance(f, ast.Name))
    calls_attention = _calls_with_kwargs(
        type(layer).forward,
        lambda f: (
            isinstance(f, ast.Attribute)
            and f.attr == attention_attr
            and isinstance(f.value, ast.Name)
            and f.value.id == "self"
        ),
    )
    return calls_layers and calls_attention


def _calls_with_kwargs(function: Callable, callee: Callable[[ast.expr], bool]) -> bool:
    """Whether `function`'s source calls something `callee` accepts with `**kwargs`."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
    except (OSError, TypeError):
        return False
    return any(
        isinstance(node, ast.Call)
        and callee(node.func)
        and any(k.arg is None and isinstance(k.value, ast.Name) for k in node.keywords)
        for node in ast.walk(ast.parse(source))
    )
