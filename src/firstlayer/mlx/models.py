"""Precomputed models in mlx-lm (arXiv 2402.13388): mlx-lm's own model class of the family, with
layer 0's token-local part read from the table.

    serial:   x = E[t]; q, k, v = rows[t]; x = x + attn(rope(q), rope(k), v); x = x + mlp(norm(x))
    parallel: r = (x + mlp(x))[t]; q, k, v = rows[t]; x = r + attn(rope(q), rope(k), v)

The family's class builds the model as always; then the input embedding becomes
`MlxTableEmbedding`, which returns the residual block's rows (x, or x + mlp(x); a tied LM head
reads the same block) and leaves the tokens' q/k/v rows for layer 0 in a context variable (one
per thread and task).
Layer 0 takes them for the length of its call: its q/k/v projections return their columns of
them, the norms in front of them pass x through (their output reaches only the projections or a
parallel block's MLP), per-head q/k norms pass through (the rows hold them applied), and a
parallel block's MLP returns zeros (its part is in the residual block). RoPE, caches, masks,
sliding windows and every other layer are the family's own code. mlx-lm keeps Hugging Face's
weight layout, so the table's columns (NeoX's per-head interleave, Phi-3's fused qkv) are what
its layer 0 would have computed; module names are mapped by the family's own `sanitize`.
"""

from __future__ import annotations

import contextvars
import functools
import json
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from packaging.version import Version

from firstlayer.conversion.mlx_names import mlx_lm_name
from firstlayer.errors import FirstLayerError
from firstlayer.hf.models import legacy_rope_fields, published_name
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, TableLayout, segments

# The mlx-lm releases whose model classes and loader this module was tested with, [first, past).
MLX_LM_VERSIONS = ("0.32.0", "0.33")


def refuse_unsupported_version(version: str) -> None:
    """An mlx-lm outside the tested range might build layer 0 otherwise: refused, not run."""
    first, past = MLX_LM_VERSIONS
    if not Version(first) <= Version(version) < Version(past):
        raise FirstLayerError(
            f"firstlayer runs precomputed models in mlx-lm >={first},<{past}, and mlx-lm "
            f"{version} is installed: pip install 'mlx-lm>={first},<{past}'"
        )


refuse_unsupported_version(mlx_lm.__version__)

# The q/k/v rows of the tokens the table embedding looked up last, waiting for layer 0; and the
# rows layer 0 is running on, for its projections.
PENDING_ROWS: contextvars.ContextVar[mx.array | None] = contextvars.ContextVar(
    "firstlayer_pending_rows", default=None
)
LAYER0_ROWS: contextvars.ContextVar[mx.array | None] = contextvars.ContextVar(
    "firstlayer_layer0_rows", default=None
)


def family_classes(model_type: str) -> tuple[type, type]:
    """mlx-lm's own (Model, ModelArgs) of a family, found the way mlx-lm finds them."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes({"model_type": model_type})
    except ValueError:
        raise FirstLayerError(
            f"mlx-lm {mlx_lm.__version__} has no model for {model_type}: run the precomputed "
            "folder in transformers or vLLM"
        ) from None


@dataclass(frozen=True)
class ModelArgs:
    """What mlx-lm's loader hands `Model`: the family's own arguments and firstlayer's record."""

    family: Any  # the family's mlx-lm ModelArgs
    model_class: type  # the family's mlx-lm Model
    record: dict
    dtype: str  # the model's, which the residual block is read in
    config_json: str  # the folder's config, for transformers' names of its weights

    @classmethod
    def from_dict(cls, config: dict) -> ModelArgs:
        record = config.get("firstlayer")
        if not record:
            raise FirstLayerError(
                "this config has no `firstlayer` record: give mlx-lm the folder that "
                "`firstlayer convert` wrote"
            )
        method = record.get("quantization", {}).get("method")
        if method is not None and method != "mlx":
            raise FirstLayerError(
                f"a folder converted from a {method} checkpoint does not run in mlx-lm: convert "
                "the dense checkpoint, or one mlx-lm quantized (`mlx_lm.convert --quantize`)"
            )
        model_type = record["model_type"]
        model_class, args_class = family_classes(model_type)
        config = {**legacy_rope_fields(config), **config, "model_type": model_type}
        family = args_class.from_dict(config)
        dtype = config.get("dtype") or "float32"
        return cls(family, model_class, record, dtype, json.dumps(config, sort_keys=True))


def Model(args: ModelArgs) -> nn.Module:  # the name mlx-lm's loader calls
    """The family's mlx-lm model with layer 0's token-local part replaced by the table."""
    model = precomputed_class(args.model_class)(args.family)
    model.firstlayer = TablePlan.of(model, args)
    model.firstlayer.install(model)
    return model


class MlxTableEmbedding(nn.Module):
    """The input embedding: token ids -> residual rows (x or x + mlp(x)), leaving the q/k/v rows
    for layer 0. Each block is an `nn.Embedding`, so `mlx_lm.convert --quantize` quantizes the
    table as it quantizes an embedding."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        qkv_width: int,
        has_head: bool,
        int8: dict[str, tuple[tuple[int, int], ...]] | None = None,
        dtype: str = "float32",
    ):
        super().__init__()
        int8 = int8 or {}
        widths = {"residual": hidden_size, "qkv": qkv_width}
        for block, width in widths.items():
            if block in int8:  # the residual block in the model's dtype, as transformers reads it
                out = getattr(mx, dtype) if block == "residual" else mx.float32
                setattr(self, block, Int8Rows(vocab_size, width, int8[block], out))
            else:
                setattr(self, block, nn.Embedding(vocab_size, width))
        if has_head:  # a parallel folder's LM head, where the family always ties it (Cohere)
            self.head = nn.Linear(hidden_size, vocab_size, bias=False)

    def __call__(self, ids: mx.array) -> mx.array:
        PENDING_ROWS.set(self.qkv(ids))  # (B, T, W - D)
        return self.residual(ids)  # (B, T, D)

    def as_linear(self, x: mx.array) -> mx.array:
        if "head" in self:
            return self.head(x)
        return self.residual.as_linear(x)  # a tied LM head: a serial residual block is E

    @property
    def weight(self) -> mx.array:
        return self.residual.weight  # families that multiply by the embedding's weight directly


class Int8Rows(nn.Module):
    """An int8 block as the folder stores it, codes (V, W) and a float32 scale per row and
    column segment (V, S), dequantized per looked-up row: the float32 product
    `table.codec.dequantize_int8` computes, at lookup instead of at load, so the table stays int8
    in memory (a quarter of float32's bytes, plus the scales)."""

    def __init__(self, vocab_size: int, width: int, ranges: tuple[tuple[int, int], ...], dtype):
        super().__init__()
        self.codes = mx.zeros((vocab_size, width), dtype=mx.int8)
        self.scales = mx.zeros((vocab_size, len(ranges)), dtype=mx.float32)
        segment = [0] * width
        for index, (start, stop) in enumerate(ranges):
            segment[start:stop] = [index] * (stop - start)
        self._segment = mx.array(segment)  # a column's scale; "_": not a weight
        self._dtype = dtype
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.codes[ids].astype(mx.float32) * mx.take(self.scales[ids], self._segment, -1)
        return rows.astype(self._dtype)


class PrecomputedLayer0Projection(nn.Module):
    """A q/k/v projection of layer 0: its columns of the rows layer 0 is running on."""

    def __init__(self, name: str, start: int, stop: int):
        super().__init__()
        self.name, self.start, self.stop = name, start, stop

    def __call__(self, x: mx.array) -> mx.array:
        rows = LAYER0_ROWS.get()
        if rows is None:
            raise FirstLayerError(f"{self.name} was precomputed: only layer 0's call runs it")
        return rows[..., self.start : self.stop].astype(x.dtype)

    def to_lora(self, **settings: Any) -> nn.Module:
        raise FirstLayerError(
            f"{self.name} is layer 0's, precomputed into the table, and mlx-lm adapters cannot "
            "change it: train and load adapters on the layers after 0 (mlx_lm.lora "
            "--num-layers below the model's number of layers)"
        )

    def _extra_repr(self) -> str:
        return f"{self.name}, columns {self.start}:{self.stop} of the table's q/k/v block"


class PassThrough(nn.Module):
    """A norm of layer 0 whose output reached only the precomputed modules."""

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x


class PrecomputedMLP(nn.Module):
    """A parallel block's MLP in layer 0: x + mlp(x) is the residual block's row."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros_like(x)


class FirstLayerBlock:
    """Mixed in before layer 0's class: the call runs on the rows its embedding looked up."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = PENDING_ROWS.get()
        if rows is None:
            raise FirstLayerError(
                "layer 0 of a precomputed model runs from the table rows of its call's token "
                "ids, and none were looked up (input embeddings cannot be given to it)"
            )
        PENDING_ROWS.set(None)
        token = LAYER0_ROWS.set(rows)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            LAYER0_ROWS.reset(token)


class PrecomputedModel:
    """Mixed in before the family's mlx-lm Model: weights by the folder's names, and no input
    embeddings (layer 0 looks rows up by token id)."""

    firstlayer: TablePlan

    def __call__(self, inputs: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if kwargs.get("input_embeddings") is not None:
            raise FirstLayerError(
                "a precomputed model looks layer 0 up by token id and cannot take input "
                "embeddings: run the original model for embedding prompts"
            )
        return super().__call__(inputs, *args, **kwargs)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        plan = self.firstlayer
        if f"{plan.folder_embedding}.qkv" in weights:  # the folder as firstlayer wrote it
            weights = {plan.checkpoint_name(k): v for k, v in weights.items()}
        table = {k: v for k, v in weights.items() if plan.is_table_weight(k)}
        rest = {k: v for k, v in weights.items() if k not in table}
        if hasattr(super(), "sanitize"):
            rest = super().sanitize(rest)
        return {**rest, **plan.table_weights(table)}


@functools.cache
def precomputed_class(base: type) -> type:
    return type(f"FirstLayer{base.__name__}", (PrecomputedModel, base), {})


@functools.cache
def layer0_class(base: type) -> type:
    return type(f"FirstLayer{base.__name__}", (FirstLayerBlock, base), {})


def module_at(root: nn.Module, path: str) -> Any:
    node: Any = root
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = module_at(root, parent) if parent else root
    if isinstance(owner, list):
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


@dataclass(frozen=True)
class TablePlan:
    """Where the table goes in one mlx-lm model, by mlx-lm's module names, and how the folder's
    table tensors become its weights."""

    record: dict
    layout: TableLayout
    embedding: str  # the table module: the family's input embedding
    folder_embedding: str  # its name in the folder (transformers')
    projections: tuple[tuple[str, str], ...]  # (mlx name, transformers name) in column order
    pass_through: tuple[str, ...]  # norms of layer 0
    mlp: str | None  # a parallel block's MLP
    # The folder's untied LM head where the family's class always ties it to the embedding: a
    # parallel row's residual block holds x + mlp(x), not E, so the table module keeps the head.
    head: str | None
    layer: str
    vocab_size: int
    dtype: str
    config_json: str

    def checkpoint_name(self, key: str) -> str:
        """A folder's weight under the name the family's checkpoints give it, which mlx-lm
        reads: the folder holds transformers' own names (GPT-NeoX's `lm_head`, for the
        published `embed_out`), as `save_pretrained` would revert them."""
        return published_name(self.config_json, key)

    @classmethod
    def of(cls, model: nn.Module, args: ModelArgs) -> TablePlan:
        record = args.record
        layout = TableLayout.from_dict(record["table"])

        def name(module: str) -> str:
            """A transformers module name as the family's sanitize renames its weights."""
            weight = f"{module}.weight"
            renamed = mlx_lm_name(args.model_class, model, args.config_json, weight)
            return (renamed or published_name(args.config_json, weight)).removesuffix(".weight")

        projections = tuple((name(c.module), c.module) for c in layout.columns)
        names = set(c.module for c in layout.columns)
        others = [m for m in record["eliminated"] if m not in names]
        mlp = others.pop() if layout.is_parallel else None
        attention = layout.columns[0].module.rpartition(".")[0]
        head = None
        if not record["lm_head"]["reads_table"]:
            try:
                module_at(model, name(record["lm_head"]["module"]))
            except (AttributeError, IndexError):
                head = record["lm_head"]["module"]
        return cls(
            record,
            layout,
            name(record["table"]["module"]),
            record["table"]["module"],
            projections,
            tuple(name(m) for m in others),
            None if mlp is None else name(mlp),
            head,
            name(attention.rpartition(".")[0]),
            model.args.vocab_size,
            args.dtype,
            args.config_json,
        )

    def int8_blocks(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """The blocks stored int8, with each one's column segments."""
        table = self.record["table"]
        dtypes = {"residual": table.get("residual_dtype", table["dtype"]), "qkv": table["dtype"]}
        return {b: segments(self.layout, b) for b in BLOCKS if dtypes[b] == "int8"}

    def install(self, model: nn.Module) -> None:
        hidden = self.layout.hidden_size
        table = MlxTableEmbedding(
            self.vocab_size,
            hidden,
            self.layout.qkv_width,
            bool(self.head),
            self.int8_blocks(),
            self.dtype,
        )
        replace_module(model, self.embedding, table)
        for (path, folder_name), column in zip(self.projections, self.layout.columns, strict=True):
            start, stop = column.start - hidden, column.stop - hidden
            projection = PrecomputedLayer0Projection(folder_name, start, stop)
            replace_module(model, path, projection)
        for path in self.pass_through:
            replace_module(model, path, PassThrough())
        if self.mlp is not None:
            replace_module(model, self.mlp, PrecomputedMLP())
        layer = module_at(model, self.layer)
        layer.__class__ = layer0_class(type(layer))

    def is_table_weight(self, key: str) -> bool:
        head = (f"{self.head}.weight",) if self.head else ()
        return key in head or key.startswith((f"{self.folder_embedding}.", f"{self.embedding}."))

    def table_weights(self, stored: dict[str, mx.array]) -> dict[str, mx.array]:
        """The table module's weights: the folder's blocks, an int8 block dequantized and the
        residual block in the model's dtype, as the transformers runtime reads them; or the
        weights mlx-lm saved itself (`mlx_lm.convert`), by its own names."""
        weights = {}
        for block in BLOCKS:
            rows = stored.get(f"{self.folder_embedding}.{block}")
            if rows is None:  # mlx-quantized: `<embedding>.qkv.weight`, `.scales`, `.biases`,
                # saved by mlx-lm, or by firstlayer from a folder mlx-lm quantized
                for name in (self.embedding, self.folder_embedding):
                    prefix = f"{name}.{block}."
                    for key, value in stored.items():
                        if key.startswith(prefix):
                            weights[f"{self.embedding}.{block}.{key.removeprefix(prefix)}"] = value
                continue
            scales = stored.get(f"{self.folder_embedding}.{block}{SCALE_SUFFIX}")
            if scales is not None:  # int8, kept so (`Int8Rows`)
                weights[f"{self.embedding}.{block}.codes"] = rows
                weights[f"{self.embedding}.{block}.scales"] = scales
                continue
            if block == "residual":
                rows = rows.astype(getattr(mx, self.dtype))
            weights[f"{self.embedding}.{block}.weight"] = rows
        if self.head:
            head = stored.get(f"{self.head}.weight")
            prefix = f"{self.embedding}.head."
            weights.update({k: v for k, v in stored.items() if k.startswith(prefix)})
            if head is not None:
                weights[f"{prefix}weight"] = head
        # The attention norm a serial folder keeps for transformers' adapters: mlx-lm adapters
        # are refused on layer 0 (`PrecomputedLayer0Projection.to_lora`), so it has no reader here.
        return weights
