"""Precomputed models in vLLM: per family a subclass of vLLM's own model class whose layer 0 runs
from the table.

The family's class builds the model as always (parallel linears, sharded embedding, attention
backends, `@support_torch_compile`); then layer 0's token-local modules are swapped out:

- the input embedding becomes `TableRows`: for token ids it returns `[x | q k v]`, x from the
  residual block (a `VocabParallelEmbedding`, sharded and all-reduced exactly as the embedding
  was; a tied LM head still reads it) and q/k/v from this rank's own columns of the table, so the
  lookup needs no communication;
- layer 0's attention norm splits that row, its fused q/k/v projection hands the rows through,
  its per-head q/k norms go (the rows have them applied), and a parallel block's MLP and norms go
  (the residual block holds x + mlp(x)).

Each rank's columns are found by the family's own loader: the table's q/k/v block, transposed, is
loaded as the weight of a `QKVParallelLinear` shaped like layer 0's projection but with the
vocabulary as its input, so every family's fusing, per-head reordering (Falcon) and kv-head
replication over ranks apply unchanged. The loaded weight is then transposed into the
(vocab, columns) table the lookup reads. An int8 table is loaded the same way, as int8, and a
second such module loads each column's segment number (q, k or v: which of a row's scales it
takes), so a rank dequantizes its own columns of the rows it looks up.

Where the table lives (`hf_overrides={"table_memory": ...}`, in the words of
`table.lookup.TABLE_MEMORY`): on the device with the weights (default), or in host memory, pinned
where there is CUDA, each step gathering its B rows on the host and copying only those to the
device. The lookup is the transformers side's (`table.lookup.gather_rows`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import (
    VllmOwnClass,
)
from firstlayer.folder import head_norms_in_table, keeps_attn_norm, kept_layer0, require_files
from firstlayer.hf.models import as_saved, to_host
from firstlayer.hf.models import model_class as transformers_class
from firstlayer.hf.patch import (
    ROWS_KWARG,
    parts_of,
    patch_as_recorded,
    refuse_embeddings_input,
)
from firstlayer.table.codec import column_segments, dequantize_int8, empty_blocks
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, Column, TableLayout, segments
from firstlayer.table.lookup import HostStaging, gather_rows, parse_table_memory
from firstlayer.vllm.checks import check_engine
from firstlayer.vllm.lora import backend_lora_layers, guard_manager, lora_layer
from firstlayer.vllm.quantized import (
    as_stored,
    declares_quantization,
    filled_with_defaults,
    refuse_quantized_layer_0,
)
from firstlayer.vllm.updates import refuse_stale_table

SOURCE = "qkv_source"  # TableRows' child the family loader fills, before the transposition
SEGMENTS = "segment_source"  # likewise for an int8 table's segment number of each column

# Where a precomputed model's table lives in vLLM (`hf_overrides={"table_memory": ...}`), in
# the words of `table.lookup.TABLE_MEMORY`: `device` (default) or `host`. vLLM loads every weight
# into parameters of its own, so a table mapped from the folder's file is not offered.
VLLM_TABLE_MEMORY = ("device", "host")


def checked_before_building(vllm_config: Any) -> str:
    """What every route checks before vLLM builds its model: the folder's files (present, this
    format, at their recorded sizes) and the engine's settings; returns the table's placement."""
    folder = Path(vllm_config.model_config.model)
    if folder.is_dir():
        require_files(folder)
    check_engine(vllm_config)
    return vllm_table_memory(vllm_config)


def vllm_table_memory(vllm_config: Any) -> str:
    """The placement asked for, refused where it cannot run."""
    memory = getattr(vllm_config.model_config.hf_config, "table_memory", "device")
    memory = parse_table_memory(memory, VLLM_TABLE_MEMORY)
    on_accelerator = vllm_config.device_config.device.type != "cpu"
    if memory == "host" and on_accelerator and not vllm_config.model_config.enforce_eager:
        raise FirstLayerError(
            "table_memory='host' looks rows up in host memory at every step, which a CUDA graph "
            "cannot capture: also pass enforce_eager=True (--enforce-eager)"
        )
    return memory


class TableRows(nn.Module):
    """The input embedding of a precomputed model in vLLM: token ids -> [x | this rank's q k v]."""

    def __init__(
        self,
        residual: nn.Module,
        source: nn.Module,
        qkv_name: str,
        scale: Tensor | None,
        segment_source: nn.Module | None = None,
        host: bool = False,
    ):
        super().__init__()
        self.residual = residual  # the family's own VocabParallelEmbedding, now holding x
        self.qkv_source = nn.Module()
        self.qkv_source.add_module(qkv_name, source)
        if segment_source is not None:
            self.segment_source = nn.Module()
            self.segment_source.add_module(qkv_name, segment_source)
        self.qkv_name = qkv_name
        self.host = host  # the q/k/v columns stay in host memory
        self.qkv: nn.Parameter | None = None  # (V, columns of this rank), after loading
        self.register_buffer("scale", scale, persistent=False)
        # int8: (V, segments) float32 scales, and the segment (q, k, v) of each of this rank's
        # columns, after loading.
        self.register_buffer("qkv_scale", None, persistent=False)
        self.register_buffer("column_segment", None, persistent=False)
        self.staging = HostStaging()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Some families compute logits with the embedding module itself as the tied LM head
            # (Gemma 2): it reads the residual block, x, as the embedding's weight.
            return getattr(super().__getattr__("residual"), name)

    def take_loaded_columns(self, qkv_scale: Tensor | None = None) -> None:
        """Turn the loaded (columns, V) weight into the (V, columns) table the lookup reads."""
        source = getattr(self.qkv_source, self.qkv_name)
        columns = source.weight.data.t().contiguous()
        del self.qkv_source
        place = to_host if self.host else (lambda t: t.to(columns.device))
        self.qkv = nn.Parameter(place(columns), requires_grad=False)
        if qkv_scale is not None:
            segment = getattr(self.segment_source, self.qkv_name).weight.data[:, 0]
            del self.segment_source
            self.column_segment = place(segment.round().long())
            self.qkv_scale = place(qkv_scale.float())

    def rows(self, input_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """This rank's q/k/v columns of the tokens' rows, in `dtype` on the ids' device."""
        return gather_rows(
            self.qkv, input_ids, dtype, self.qkv_scale, self.column_segment, self.staging
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        # An id outside the vocabulary (vLLM checks ids only where it has a tokenizer) reads a
        # zero row, as the original's sharded embedding reads a zero embedding for it: raising
        # here, inside the engine's step, would kill the engine for every client.
        inside = (input_ids >= 0) & (input_ids < self.qkv.shape[0])
        input_ids = torch.where(inside, input_ids, 0)
        x = self.residual(input_ids)
        if self.scale is not None:
            x = x * self.scale  # as the family's embed_input_ids scales it (Gemma's sqrt(D))
        row = torch.cat([x, self.rows(input_ids, x.dtype)], dim=-1)
        return row * inside.unsqueeze(-1).to(row.dtype)


def split_row(hidden_states: Tensor, hidden_size: int) -> tuple[Tensor, Tensor]:
    """[x | q k v] -> (x, q k v), each contiguous for vLLM's fused CPU and GPU kernels."""
    x, rows = hidden_states.split([hidden_size, hidden_states.shape[-1] - hidden_size], dim=-1)
    return x.contiguous(), rows.contiguous()


class SplitRows(nn.Module):
    """Layer 0's attention norm in a fused serial layer: (row, row) -> (q k v, x).

    vLLM's serial layers take (hidden_states, residual) and, given a residual, call their norm as
    `norm(hidden_states, residual) -> (normed, new residual)`. Layer 0 is handed the table row as
    both, so its norm returns the rows for attention and x as the residual stream. `norm` is
    layer 0's own attention norm, kept where the folder keeps it (the weights of the table
    module's `attn_norm`); with LoRA on (`with_adapter_input`) attention gets [q k v | norm(x)],
    the same norm on the same x as the original's layer 0. It is `kept_norm`, not `norm`: vLLM's
    Mistral loader renames any weight path holding a `norm` segment to the final norm's."""

    def __init__(
        self, hidden_size: int, norm: nn.Module | None = None, with_adapter_input: bool = False
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.kept_norm = norm
        self.with_adapter_input = with_adapter_input

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> tuple[Tensor, ...]:
        if residual is None:
            raise FirstLayerError("layer 0 of a precomputed model must be given the table row")
        x, rows = split_row(hidden_states, self.hidden_size)
        if self.with_adapter_input:
            normed = x if self.kept_norm is None else self.kept_norm(x)
            return torch.cat([rows, normed], dim=-1), x
        return rows, x

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


class RowsAsProjection(nn.Module):
    """Layer 0's q/k/v projection: its input already is q k v (vLLM linears return (out, bias))."""

    def forward(self, rows: Tensor) -> tuple[Tensor, None]:
        return rows, None


class Eliminated(nn.Module):
    """A module of layer 0 whose work the table holds; a call means a wiring mistake."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise FirstLayerError(f"{self.name} was precomputed into the table and must not run")

    def extra_repr(self) -> str:
        return self.name


class SerialRowLayer:
    """Mixed in before a serial layer's class that fuses the residual add into its norms."""

    def forward(self, positions: Tensor, hidden_states: Tensor, residual: Any = None, **kwargs):
        # Given a residual, the layer takes the branch that calls `norm(hidden_states, residual)`,
        # where SplitRows turns the row into (q k v, x).
        return super().forward(positions, hidden_states, hidden_states, **kwargs)


class ParallelRowLayer:
    """A parallel block from the table: attention(q k v) + (x + mlp(ln(x)))."""

    hidden_size: int

    def forward(self, position_ids: Tensor, hidden_states: Tensor) -> Tensor:
        residual, rows = split_row(hidden_states, self.hidden_size)
        return self.attn(position_ids=position_ids, hidden_states=rows) + residual


class ParallelRowLayerWithBias:
    """A parallel block from the table whose attention returns (output, bias) and which may
    defer the all-reduce to after attention and MLP are summed: attention(q k v) + (x + mlp)."""

    hidden_size: int

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        residual, rows = split_row(hidden_states, self.hidden_size)
        output, bias = self.self_attention(positions=positions, hidden_states=rows)
        if not self.reduce_row_parallel_results:
            # The family sums attention and MLP before one all-reduce; the MLP's part is in x.
            output = tensor_model_parallel_all_reduce(output)
        if bias is not None:
            output = output + bias
        return output + residual


# The layer classes by `VllmOwnClass.kind`.
ROW_LAYERS = {
    "serial": SerialRowLayer,
    "parallel": ParallelRowLayer,
    "parallel_with_bias": ParallelRowLayerWithBias,
}


@functools.cache
def first_layer_class(kind: str, base: type) -> type:
    return type(f"FirstLayer{base.__name__}", (ROW_LAYERS[kind], base), {})


def holds_layer_0(model: nn.Module, name: str) -> bool:
    """Whether this pipeline stage holds layer 0 (`name`, or a module inside it: vLLM puts a
    placeholder where a stage lacks a layer), and so the table. Only the first stage may: the
    token ids enter there (`checks.refuse_layer_0_off_the_first_stage`)."""
    from vllm.distributed import get_pp_group
    from vllm.model_executor.models.utils import PPMissingLayer

    parts = name.split(".")
    path = (".".join(parts[: i + 1]) for i in range(len(parts)))
    here = not any(isinstance(model.get_submodule(p), PPMissingLayer) for p in path)
    if here != get_pp_group().is_first_rank:
        raise FirstLayerError(
            "firstlayer's table feeds layer 0 from the first pipeline stage's embedding, and "
            "layer 0 is not on the first stage: give the first stage at least one layer "
            "(VLLM_PP_LAYER_PARTITION)"
        )
    return here


def other_stage_weights(
    model: nn.Module, weights: Iterable[tuple[str, Tensor]], module: str, table: str
) -> Iterable[tuple[str, Tensor]]:
    """The weights of a pipeline stage without layer 0: the table module's go nowhere, except
    the residual block where this stage builds the embedding module: a last stage whose LM head
    is tied to it reads it (a tied head keeps the residual block only in serial folders, whose
    rows start with x, the embedding itself), and families such as GPT-J build it on every stage
    and read it only on the first (there a parallel row's x + mlp(x) is never read)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    tied_here = not isinstance(model.get_submodule(table), PPMissingLayer)
    for name, tensor in weights:
        if not name.startswith(f"{module}."):
            yield name, tensor
        elif tied_here and name == f"{module}.residual":
            yield f"{module}.weight", tensor


def vllm_name(model: nn.Module, name: str) -> str:
    """A transformers module name in vLLM's tree, by the family's own checkpoint mapper
    (GPT-OSS keeps its embedding as `model.embedding`)."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is None:
        return name
    mapped = mapper._map_name(f"{name}.weight")
    return name if mapped is None else mapped.removesuffix(".weight")


def vllm_module_name(model: nn.Module, name: str) -> str:
    """A transformers module name as vLLM names an adapter's module: its parent mapped as the
    family's checkpoint mapper maps it, its own name kept (the mapper would rename q_proj into
    the packed qkv_proj, while an adapter's modules are named before packing)."""
    parent, _, leaf = name.rpartition(".")
    if not parent:
        return name
    probe = vllm_name(model, f"{parent}.firstlayer_probe")
    return f"{probe.removesuffix('.firstlayer_probe')}.{leaf}"


def install_table(
    model: nn.Module,
    family: VllmOwnClass,
    record: dict,
    vocab_size: int,
    memory: str = "device",
    lora_config: Any = None,
) -> None:
    """Swap layer 0's token-local modules of a freshly built vLLM model for an empty table; with
    LoRA on (`lora_config`), layer 0's q/k/v take an adapter's part where the folder keeps what
    it reads (`vllm.lora`)."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    layout = TableLayout.from_dict(record["table"])
    if family.kind != "serial" and not layout.is_parallel:
        raise FirstLayerError(
            f"a serial {record['model_type']} model is not served by firstlayer's vLLM plugin"
        )
    layer = model.get_submodule(family.layer)
    attention = layer.get_submodule(family.attention)
    projection = attention.get_submodule(family.qkv)
    total_width = projection.total_num_heads * projection.head_size + (
        projection.total_num_kv_heads * (projection.head_size + projection.v_head_size)
    )
    if total_width != layout.qkv_width:
        raise FirstLayerError(
            f"vLLM's {family.layer}.{family.attention}.{family.qkv} has "
            f"{total_width} output columns, the table {layout.qkv_width}: the "
            "config.json does not describe the table; convert the source again"
        )
    eliminated = {f"{family.layer}.{family.attention}.{family.qkv}": projection}
    if family.kind != "serial" and family.mlp is not None and hasattr(layer, family.mlp):
        eliminated[f"{family.layer}.{family.mlp}"] = layer.get_submodule(family.mlp)
    refuse_quantized_layer_0(eliminated, record)
    is_int8 = record["table"]["dtype"] == "int8"

    def like_projection(inputs: int, child: str, params_dtype: torch.dtype | None):
        """A projection shaped like layer 0's, over `inputs`: the family loader shards it."""
        return QKVParallelLinear(
            hidden_size=inputs,
            head_size=projection.head_size,
            total_num_heads=projection.total_num_heads,
            total_num_kv_heads=projection.total_num_kv_heads,
            bias=False,
            params_dtype=params_dtype,
            v_head_size=projection.v_head_size,
            prefix=f"{record['table']['module']}.{child}.{family.qkv}",
        )

    # In host memory from the start when asked: the table never occupies the accelerator.
    with torch.device("cpu") if memory == "host" else contextlib.nullcontext():
        source = like_projection(vocab_size, SOURCE, torch.int8 if is_int8 else None)
        segment_source = like_projection(1, SEGMENTS, torch.float32) if is_int8 else None
    scale = None
    if family.scale is not None:
        owner, _, buffer = family.scale.rpartition(".")
        holder = model.get_submodule(owner)
        scale = getattr(holder, buffer).clone()
        getattr(holder, buffer).fill_(1)  # the family multiplies [x | rows]; TableRows scales x
    embedding_name = vllm_name(model, record["table"]["module"])
    embedding = model.get_submodule(embedding_name)
    rows = TableRows(embedding, source, family.qkv, scale, segment_source, memory == "host")
    model.set_submodule(embedding_name, rows)

    adapter_input = record.get("adapter_input")
    with_lora = lora_config is not None and family.kind == "serial" and adapter_input is not None
    if with_lora:
        attention.set_submodule(family.qkv, lora_layer(projection, model, family.qkv, lora_config))
    else:
        attention.set_submodule(family.qkv, RowsAsProjection())
    # Folded into the rows in folders before format 6; from format 6 on, q and k are stored
    # before them and the family's attention runs them, an adapter's change included.
    if head_norms_in_table(record, layout.is_parallel):
        for name in family.head_norms:
            if hasattr(attention, name):
                attention.set_submodule(name, nn.Identity())
    eliminated = [n for n in (*family.norms, family.mlp) if n is not None and hasattr(layer, n)]
    if family.kind == "serial":
        norm = layer.get_submodule(family.norms[0]) if keeps_attn_norm(record) else None
        split = SplitRows(layout.hidden_size, norm, with_adapter_input=with_lora)
        layer.set_submodule(family.norms[0], split)
        eliminated = eliminated[1:]
    for name in eliminated:
        layer.set_submodule(name, Eliminated(f"{family.layer}.{name}"))
    layer.hidden_size = layout.hidden_size
    layer.__class__ = first_layer_class(family.kind, type(layer))


class PrecomputedInVllm:
    """What both routes share: adapters refused where inexact, updates where they would leave
    the table stale (`vllm.updates`), the first load told from later ones."""

    hf_config: Any
    firstlayer_loaded: bool = False  # the first load_weights has run

    def makes_table_stale(self, name: str) -> bool:
        """Whether new values for checkpoint tensor `name` would leave the table behind: the
        table's own, the embedding's, layer 0's token-local modules', a tied LM head's."""
        record = self.hf_config.firstlayer
        modules = [record["table"]["module"], *record["eliminated"]]
        if record["lm_head"]["reads_table"]:
            modules.append(record["lm_head"]["module"])
        return any(name.startswith(f"{module}.") for module in modules)

    def load_update(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """A load after the first: new values for some weights, none the table depends on."""
        weights = list(weights)
        refuse_stale_table(self, (name for name, _ in weights))
        return set(super().load_weights(weights))

    # vLLM's LoRA manager ends its __init__ with `model.lora_manager = manager`: the one place a
    # model meets it, where the plugin has it refuse adapters it cannot apply exactly.

    @property
    def lora_manager(self) -> Any:
        return self.__dict__.get("firstlayer_lora_manager")

    @lora_manager.setter
    def lora_manager(self, manager: Any) -> None:
        self.__dict__["firstlayer_lora_manager"] = manager
        guard_manager(manager, self.hf_config, functools.partial(vllm_module_name, self))


class PrecomputedVllmModel(PrecomputedInVllm):
    """Mixed in before vLLM's own causal-LM class of a family."""

    family: VllmOwnClass
    model_type: str

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        memory = checked_before_building(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.hf_config = config
        self.firstlayer_record = config.firstlayer
        # Pipeline parallel: the first stage holds layer 0 and the table, the others are built
        # as vLLM builds them.
        self.holds_table = holds_layer_0(self, vllm_name(self, self.family.layer))
        if self.holds_table:
            install_table(
                self,
                self.family,
                self.firstlayer_record,
                config.vocab_size,
                memory,
                vllm_config.lora_config,
            )

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The family's loader, fed the table under the names of the modules it fills; raises if
        any parameter was left unloaded (vLLM's own check exempts ordinary linears)."""
        if self.firstlayer_loaded:
            return self.load_update(weights)
        record = self.firstlayer_record
        embedding = record["table"]["module"]
        layout = TableLayout.from_dict(record["table"])

        table = vllm_name(self, embedding)  # the name in vLLM's tree, which mappers keep
        arrived = set()
        int8 = {}  # the int8 blocks' scales, and a parallel row's int8 residual until its scale

        def seen() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in weights:
                arrived.add(name)
                yield name, tensor

        if not self.holds_table:
            stage = other_stage_weights(self, seen(), embedding, table)
            loaded = set(super().load_weights(stage))
            refuse_missing(self, self.hf_config, arrived, loaded)
            self.firstlayer_loaded = True
            return loaded

        # Layer 0's q/k/v kept for embedding inputs (`keep_layer0`), which this plugin does not
        # take (prompt embeddings are refused at config): the table serves every token.
        kept = kept_layer0(record)

        def renamed() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in seen():
                block = name.removeprefix(f"{embedding}.")
                if name.rpartition(".")[0] in kept:
                    continue
                if block in (f"residual{SCALE_SUFFIX}", f"qkv{SCALE_SUFFIX}") or (
                    block == "residual" and tensor.dtype == torch.int8
                ):
                    int8[block] = tensor
                    if {"residual", f"residual{SCALE_SUFFIX}"} <= int8.keys():
                        # A parallel row's residual block goes into the embedding it replaced,
                        # in the model's dtype: dequantized once, as the transformers side
                        # dequantizes the rows it looks up.
                        codes, scales = int8.pop("residual"), int8.pop(f"residual{SCALE_SUFFIX}")
                        segment = column_segments(segments(layout, "residual"))
                        residual = dequantize_int8(codes, scales, segment)
                        yield f"{table}.residual.weight", residual
                elif block == "residual":
                    yield f"{table}.residual.weight", tensor
                elif block.startswith("attn_norm."):  # layer 0's norm, into SplitRows
                    norm = f"{vllm_name(self, self.family.layer)}.{self.family.norms[0]}.kept_norm"
                    yield f"{norm}.{block.removeprefix('attn_norm.')}", tensor
                elif block == "qkv":
                    segment = segment_weight(layout) if tensor.dtype == torch.int8 else None
                    for column in layout.columns:
                        start = column.start - layout.hidden_size
                        stop = column.stop - layout.hidden_size
                        projection = column.module.rpartition(".")[2]
                        # The columns as a projection's weight: (outputs, inputs = vocabulary).
                        weight = tensor[:, start:stop].t().contiguous()
                        yield f"{table}.{SOURCE}.{projection}.weight", weight
                        if segment is not None:
                            yield f"{table}.{SEGMENTS}.{projection}.weight", segment[start:stop]
                else:
                    yield name, tensor

        loaded = set(super().load_weights(renamed()))
        refuse_missing(self, self.hf_config, arrived, loaded)
        self.get_submodule(table).take_loaded_columns(int8.get(f"qkv{SCALE_SUFFIX}"))
        self.firstlayer_loaded = True
        internal = (f".{SOURCE}.", f".{SEGMENTS}.")
        return {n for n in loaded if not any(i in n for i in internal)} | {f"{table}.qkv"}


def segment_weight(layout: TableLayout) -> Tensor:
    """Each q/k/v column's segment as a one-input projection's weight, (columns, 1): loaded like
    the columns, so that each rank learns which of a row's int8 scales its columns take."""
    return column_segments(segments(layout, "qkv")).float()[:, None]


def refuse_missing(
    model: nn.Module, config: Any, arrived: set[str] | None, loaded: set[str]
) -> None:
    """Raise unless every tensor the folder should hold arrived and every parameter was loaded.

    vLLM marks a fused parameter loaded when any one of its parts arrived, and its own check
    exempts ordinary linears and embeddings (and skips quantized models altogether): count the
    folder's tensors by the names the transformers model has (a quantized Linear's by those
    its folder stores, `vllm.quantized`), then vLLM's parameters, less those no checkpoint
    carries (KV-cache quantization scales). `arrived` None: the parameters only (a multimodal
    wrapper, whose loader renames the folder's tensors itself)."""
    fused = getattr(model, "packed_modules_mapping", None) or {}
    missing = [] if arrived is None else sorted(expected_tensors(config, arrived, fused) - arrived)
    parameters = {name for name, _ in model.named_parameters()}
    missing += sorted(parameters - loaded - filled_with_defaults(model))
    if missing:
        raise FirstLayerError(
            f"the folder lacks weights the precomputed {config.firstlayer['model_type']} model "
            f"needs ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
            "convert the source again"
        )


class PrecomputedTransformersForCausalLM(PrecomputedInVllm):
    """Mixed in before vLLM's Transformers backend, for the families vLLM has no class of its
    own for (GPT-NeoX, Phi): the backend builds the family's transformers model with vLLM's
    linears and attention, and layer 0 is then patched exactly as on the transformers side
    (`firstlayer.hf.patch.patch`): the rows reach layer 0's attention as a keyword argument of
    the model call. One rank only: the table's columns are not sharded on this route."""

    model_type: str

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        memory = checked_before_building(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hf_config = vllm_config.model_config.hf_config
        record = self.hf_config.firstlayer
        # Layer 0, by the module of the table's first columns (a projection inside it).
        first = TableLayout.from_dict(record["table"]).columns[0].module
        self.holds_table = holds_layer_0(self, backend_name(self, first))
        if self.holds_table:
            patch_transformers_backend(self, self.hf_config, memory, vllm_config.lora_config)

    @functools.cached_property
    def _from_config_kwargs(self) -> dict[str, Any]:
        """The family's own config for the backend's AutoModel: the base model it builds is
        the family's, patched afterwards."""
        return dict(
            config=source_config(self.config, self.config._attn_implementation),
            dtype=self.model_config.dtype,
            trust_remote_code=self.model_config.trust_remote_code,
        )

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The backend's forward, with this call's rows among the keyword arguments it hands the
        transformers model (vLLM's compile wrapper calls the model's forward directly, so the
        base model's pre-hook that looks them up on the transformers side does not run)."""
        refuse_embeddings_input({"inputs_embeds": inputs_embeds})
        if not self.holds_table:  # a later pipeline stage: layer 0 ran on the first
            return super().forward(input_ids, positions, intermediate_tensors, None, **kwargs)
        table = self.model.get_input_embeddings()
        rows = table.rows(input_ids if input_ids.ndim == 2 else input_ids[None])
        # As long as the token count, which vLLM's compiled graph leaves dynamic.
        torch._dynamo.mark_dynamic(rows, 1)
        kwargs[ROWS_KWARG] = rows
        return super().forward(input_ids, positions, intermediate_tensors, None, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        if self.firstlayer_loaded:
            return self.load_update(weights)
        arrived = set()

        def seen() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in weights:
                arrived.add(name)
                yield name, tensor

        stream = seen()
        if not self.holds_table:
            module = self.hf_config.firstlayer["table"]["module"]
            table = backend_name(self, module)
            stream = other_stage_weights(self, stream, module, table)
        loaded = set(super().load_weights(stream))
        refuse_missing(self, self.hf_config, arrived, loaded)
        self.firstlayer_loaded = True
        return loaded


def source_config(config: Any, attn_implementation: str) -> Any:
    """A precomputed config as its family's plain config (no firstlayer record)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = {k: v for k, v in config.to_dict().items() if k != "firstlayer"}
    family = config.firstlayer["model_type"]
    values["model_type"] = family
    plain = CONFIG_MAPPING[family].from_dict(values)
    plain._attn_implementation = attn_implementation
    plain.dtype = torch.get_default_dtype()
    return plain


def backend_name(model: nn.Module, name: str) -> str:
    """A transformers module name in the Transformers backend's tree (its checkpoint mapper)."""
    target = model.hf_to_vllm_mapper._map_name(f"{name}.weight")
    if target is None:
        raise FirstLayerError(f"vLLM's Transformers backend has no module for {name}")
    return target.removesuffix(".weight")


def patch_transformers_backend(
    model: nn.Module, config: Any, memory: str = "device", lora_config: Any = None
) -> None:
    """Patch the backend's transformers model as `hf.patch.patch` patches a transformers model:
    the declaration's module names, mapped the way the backend maps checkpoint names onto its own
    tree (the family's base model -> `model.`). The table's blocks are empty, in their stored
    dtypes, for the backend's loader to fill; with `memory="host"` the ones only the lookup
    reads are in host memory (`TableEmbedding.host_blocks`). With LoRA on (`lora_config`), a
    serial layer 0's q/k/v take an adapter's part (`vllm.lora.backend_lora_layers`)."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    record = config.firstlayer
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(source_config(config, "eager"))
    parts, _ = parts_of(reference, record)

    mapped = functools.partial(backend_name, model)
    parts = dataclasses.replace(
        parts,
        embedding=mapped(parts.embedding),
        attn_norm=mapped(parts.attn_norm),
        projections=tuple(mapped(p) for p in parts.projections),
        head_norms={k: mapped(v) for k, v in parts.head_norms.items()},
        lm_head="lm_head",
        mlp_norm=mapped(parts.mlp_norm) if parts.mlp_norm else None,
        mlp=mapped(parts.mlp) if parts.mlp else None,
    )
    recorded = TableLayout.from_dict(record["table"])
    columns = tuple(Column(mapped(c.module), c.start, c.stop) for c in recorded.columns)
    fused = None
    if len({c.module for c in columns}) < len(columns):
        # The backend fused q, k and v into one projection (Phi) whose output its rewritten
        # forward splits by the projection's sizes: the rows are all three, in that order.
        columns = (Column(columns[0].module, columns[0].start, columns[-1].stop),)
        fused = model.get_submodule(columns[0].module)
    layout = TableLayout(recorded.hidden_size, recorded.is_parallel, columns)
    eliminated = [c.module for c in columns] + ([parts.mlp] if layout.is_parallel else [])
    refuse_quantized_layer_0({n: model.get_submodule(n) for n in eliminated if n}, record)
    model_dtype = torch.get_default_dtype()  # vLLM builds the model under the model's dtype
    device = "cpu" if memory == "host" else None
    blocks, scales = empty_blocks(record["table"], recorded, config.vocab_size, model_dtype, device)
    if memory == "host" and not recorded.is_parallel:
        # A serial row's residual block is the embedding and tied LM head: with the weights.
        blocks["residual"] = blocks["residual"].to(torch.empty(0).device)
    from vllm.model_executor.models.utils import PPMissingLayer

    if isinstance(model.get_submodule(parts.lm_head), PPMissingLayer):
        # A first pipeline stage that is not the last: its LM head is elsewhere (the last stage
        # ties it to an embedding loaded from the residual block, `other_stage_weights`).
        record = {**record, "lm_head": {**record["lm_head"], "reads_table": False}}
    with_lora = lora_config is not None and record.get("adapter_input") is not None
    # The backend's own projections, whose shapes the LoRA layers take.
    projections = {c.module: model.get_submodule(c.module) for c in columns} if with_lora else {}
    patch_as_recorded(model, parts, layout, record, blocks, scales, model_dtype)
    if with_lora:
        backend_lora_layers(model, projections, lora_config)
    table = model.get_submodule(parts.embedding)
    # One scale per row and recorded segment, also where the backend fused the projections.
    for block in BLOCKS:
        if getattr(table, block + SCALE_SUFFIX) is not None:
            table.segments[block] = column_segments(segments(recorded, block), device="cpu")
    if memory == "host":
        host = ("qkv", "residual") if recorded.is_parallel else ("qkv",)
        names = (*host, *(block + SCALE_SUFFIX for block in host))
        present = [n for n in names if getattr(table, n) is not None]
        table.keep_on_host({n: to_host(getattr(table, n)) for n in present})
    if fused is not None:
        rows_module = model.get_submodule(columns[0].module)
        rows_module.output_sizes, rows_module.tp_size = fused.output_sizes, fused.tp_size


def expected_tensors(
    config: Any, stored: set[str] | None = None, fused: dict[str, list[str]] | None = None
) -> set[str]:
    """The tensor names a folder of this config holds: the precomputed transformers model's
    state dict, built on the meta device, less the weights it ties to others. In a quantized
    folder, whose tensor names are `stored`, each quantized Linear holds its method's tensors
    instead of a plain weight, the same in every part of one of vLLM's `fused` projections."""
    from transformers import AutoModelForCausalLM

    # Registered with AutoModelForCausalLM here too: a config vLLM hands its workers by pickle
    # has not run the __post_init__ that registers it.
    transformers_class(config.firstlayer["model_type"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    kept = {name: t for name, t in model.state_dict().items() if name not in tied}
    names = set(as_saved(model, kept))  # under the names a checkpoint holds (Mixtral's experts)
    if stored is None or not declares_quantization(config):
        return names
    linears = (name for name, module in model.named_modules() if isinstance(module, nn.Linear))
    return as_stored(names, linears, stored, fused or {})
