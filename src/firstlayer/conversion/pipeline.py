"""The conversion pipeline, one for every entry point:

    weights (a loaded model, or a safetensors checkpoint read out of core)
      -> plan (layer 0's parts, the table's layout)
      -> table rows (float32, a vocabulary chunk at a time, encoded in the table's dtype)
      -> sink (blocks in memory: `precompute`; sharded files with every kept weight: `convert`)
      -> self-check (rows read back from the sink against the source's own layer 0)
      -> a patched model, or a published folder

Options travel as one `ConvertOptions`.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.analysis.sources import (
    MLX_METHOD,
    QUANTIZED_FOR,
    config_quantization,
    quantization_method,
    refuse_quantized,
    resolve_source,
)
from firstlayer.conversion.quantized import (
    QUANTIZED_SUFFIXES,
    converted_quantization_config,
    dequantize,
)
from firstlayer.conversion.selfcheck import (
    SAMPLE_ROWS,
    SelfCheck,
    compare_rows,
    layer0_reference,
    require,
    sample_ids,
    special_token_ids,
    stored_rows,
    tolerance_for,
)
from firstlayer.conversion.weights import (
    COPY_BLOCK_BYTES,
    Checkpoint,
    NeedsLoading,
    Weights,
    checkpoint_weights,
    embedding_rows,
    loaded_weights,
    materialize,
    meta_model,
    quantization_dict,
    quantize_layer0_inputs,
    rows_at,
    token_local_modules,
)
from firstlayer.errors import FirstLayerError
from firstlayer.families import Parts, family_config, family_of
from firstlayer.folder import (
    MLX_MODEL_FILE,
    file_sha256,
    is_precomputed_folder,
    keeps_attn_norm,
    kept_layer0,
    publish,
    read_record,
    table_record,
    write_folder,
)
from firstlayer.hf.adapters import merge_adapters, plain_lora_deltas
from firstlayer.hf.loading import (
    load_source,
    load_tokenizer,
    parse_dtype,
    refuse_larger_vocabulary,
    refuse_mismatched_shapes,
)
from firstlayer.hf.models import adopt, as_saved, saved_config
from firstlayer.hf.patch import lm_head_reads_table, parts_of, patch_as_recorded
from firstlayer.safetensors_io import DEFAULT_MAX_SHARD_SIZE, SafetensorsFolder, TensorSpec
from firstlayer.table.build import TokenLocal, table_chunks
from firstlayer.table.codec import TABLE_DTYPES, block_dtypes, encode_rows
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, TableLayout, segments, table_layout

Progress = Callable[[int, int], None]


def parse_table_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in TABLE_DTYPES:
        raise FirstLayerError(
            f"table dtype {name!r} is not supported: use one of {', '.join(TABLE_DTYPES)}"
        )
    return TABLE_DTYPES[name]


@dataclass(frozen=True)
class ConvertOptions:
    """How a conversion stores what it builds, and whom it tells."""

    dtype: torch.dtype | None = None  # the stored weights' (default: the source's)
    table_dtype: torch.dtype | None = None  # the table's (default: `dtype`)
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE  # shards with an index above it
    force: bool = False  # replace an existing output folder
    accept_error: bool = False  # publish a table past its dtype's self-check bound, recorded
    progress: Progress | None = None  # (rows done, rows in all), after each chunk
    on_check: Callable[[SelfCheck], None] | None = None  # receives the self-check's result
    adapters: tuple[Path, ...] = ()  # PEFT adapter folders, merged into the source first
    # A quantized checkpoint whose scheme quantizes inputs: the engine layer 0's rows follow.
    quantized_for: str = "vllm"
    # Layer 0's q/k/v weights (and attention norm) kept beside the table, under the original's
    # names: positions fed by an embedding (inputs_embeds) then run them (`hf.patch.KeptLayer0`).
    keep_layer0: bool = False

    @classmethod
    def of(cls, options: ConvertOptions | None = None, **settings: Any) -> ConvertOptions:
        """Options from keyword settings (dtypes may be named), over `options`."""
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown conversion settings: {', '.join(sorted(unknown))}")
        if "dtype" in settings:
            settings["dtype"] = parse_dtype(settings["dtype"])
        if "table_dtype" in settings:
            settings["table_dtype"] = parse_table_dtype(settings["table_dtype"])
        if settings.get("quantized_for", "vllm") not in QUANTIZED_FOR:
            raise FirstLayerError(
                f"quantized_for {settings['quantized_for']!r}: one of {', '.join(QUANTIZED_FOR)}"
            )
        if "adapters" in settings:
            settings["adapters"] = tuple(Path(a) for a in settings["adapters"] or ())
            refuse_missing_adapters(settings["adapters"])
        return dataclasses.replace(options or cls(), **settings)


def refuse_missing_adapters(folders: tuple[Path, ...]) -> None:
    for folder in folders:
        if not (folder / "adapter_config.json").is_file():
            raise FirstLayerError(
                f"{folder}: not a PEFT adapter (no adapter_config.json): pass the folder PEFT's "
                "save_pretrained wrote"
            )


def adapters_record(folders: tuple[Path, ...]) -> list[dict]:
    """Which adapters a folder's weights have merged in, each by name and checksum."""
    record = []
    for folder in folders:
        weights = next(folder.glob("adapter_model.*"), None)
        digest = file_sha256(weights) if weights is not None else None
        record.append({"name": folder.name, "sha256": digest})
    return record


@dataclass(frozen=True)
class Plan:
    """What precompute and convert do to a model."""

    model_type: str  # the family's
    parts: Parts
    layout: TableLayout
    lm_head_reads_table: bool  # serial blocks and a tied LM head: it reads the residual block


def plan_for(model: nn.Module, from_checkpoint: bool = False) -> Plan:
    """The plan for a model; refuses one that is precomputed already, and a loaded quantized one
    (`from_checkpoint`: the meta model of a checkpoint, whose quantized tensors are read as they
    are stored)."""
    if getattr(model.config, "firstlayer", None):
        raise FirstLayerError("this model is precomputed already")
    refuse_quantized(quantization_dict(model.config), "this model", loaded=not from_checkpoint)
    parts, parallel = parts_of(model)
    layout = table_layout(model, parts, parallel)
    reads_table = lm_head_reads_table(model, parts, parallel)
    return Plan(family_config(model.config)["model_type"], parts, layout, reads_table)


def table_rows(
    token_local: TokenLocal,
    layout: TableLayout,
    dtypes: dict[str, torch.dtype],
    vocab_size: int,
    progress: Progress | None,
) -> Iterator[tuple[str, int, Tensor, Tensor | None]]:
    """The row generator: (block, first id, rows as stored, int8 scales or None), both blocks,
    the whole vocabulary, a chunk at a time."""
    for index, block in enumerate(BLOCKS):
        ranges = segments(layout, block)
        for start, rows in table_chunks(token_local, vocab_size, block):
            stored, scales = encode_rows(rows, dtypes[block], ranges)
            yield block, start, stored, scales
            if progress:
                progress(index * vocab_size + start + len(rows), len(BLOCKS) * vocab_size)


class MemorySink:
    """The table's blocks (and int8 scales) in memory, for a model to run from."""

    def __init__(
        self, layout: TableLayout, dtypes: dict[str, torch.dtype], vocab_size: int, device: Any
    ):
        self.blocks, self.scales = {}, {}
        for block in BLOCKS:
            shape = (vocab_size, layout.block_width(block))
            self.blocks[block] = torch.empty(shape, dtype=dtypes[block], device=device)
            if dtypes[block] == torch.int8:
                count = len(segments(layout, block))
                self.scales[block] = torch.empty(vocab_size, count, device=device)

    def write(self, rows: Iterator[tuple[str, int, Tensor, Tensor | None]]) -> None:
        for block, start, stored, scales in rows:
            self.blocks[block][start : start + len(stored)] = stored
            if scales is not None:
                self.scales[block][start : start + len(stored)] = scales

    def read(self, block: str, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        scales = self.scales.get(block)
        return self.blocks[block][ids].cpu(), None if scales is None else scales[ids].cpu()


# The record's residual dtype where the block is an mlx-quantized embedding, kept as stored.
MLX_QUANTIZED_BLOCK = "mlx-quantized"


def verbatim_embedding(weights: Weights, planned: Plan) -> dict[str, tuple[str, Tensor]]:
    """A serial model's embedding as a folder mlx-lm quantized stores it, by part (`weight`,
    `scales`, `biases`): (the stored tensor, a meta tensor of its dtype and shape). The table's
    residual block keeps it as stored, so that its lookup and a tied LM head run mlx's own
    quantized kernels on the same bytes as the original. Empty for any other source."""
    checkpoint, module = weights.checkpoint, planned.parts.embedding
    if checkpoint is None or planned.layout.is_parallel or module not in checkpoint.quantized:
        return {}
    if checkpoint.quantization["quant_method"] != MLX_METHOD:
        return {}
    parts = checkpoint.quantized[module].items()
    return {n.removeprefix(f"{module}."): (checkpoint.names[n], meta) for n, meta in parts}


def folder_reader(folder: Path, module: str, hidden_size: int) -> Callable[[str, Tensor], tuple]:
    """Stored rows of a written folder's table, read back from its files (an mlx-quantized
    residual block dequantized as mlx does)."""
    files = SafetensorsFolder(folder)

    def read(block: str, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        def rows(name: str) -> Tensor:
            return torch.cat([files.rows(name, i, i + 1) for i in ids.tolist()])

        name = f"{module}.{block}"
        if f"{name}.scales" in files:
            tensors = {part: rows(f"{name}.{part}") for part in QUANTIZED_SUFFIXES[MLX_METHOD]}
            shape = (len(ids), hidden_size)
            return dequantize({"quant_method": MLX_METHOD}, name, tensors, shape), None
        has_scales = name + SCALE_SUFFIX in files
        return rows(name), rows(name + SCALE_SUFFIX) if has_scales else None

    return read


def self_check(
    weights: Weights,
    planned: Plan,
    read: Callable[[str, Tensor], tuple],
    table_dtype: torch.dtype,
    options: ConvertOptions,
    record: dict,
) -> SelfCheck:
    """Sampled rows as the sink holds them against the source's own layer 0 on the same ids;
    refused past the dtype's bound unless `accept_error`, which the record then keeps."""
    model = weights.model
    model_dtype = model.get_submodule(planned.parts.embedding).weight.dtype
    vocab_size = weights.embedding_weight.shape[0]
    ids = sample_ids(vocab_size, special_token_ids(model.config, weights.tokenizer))
    expected = layer0_reference(model, planned.parts, planned.layout, weights.embedding_rows, ids)
    tolerance = tolerance_for(table_dtype, model_dtype)
    result = compare_rows(
        stored_rows(read, ids, planned.layout), expected, ids, planned.layout, tolerance
    )
    if not result.passed and options.accept_error:
        # Kept on request; the record says so, and `verify` repeats it.
        record["accepted_row_error"] = {"max": result.max_error, "tolerance": tolerance}
    else:
        require(result)
    if options.on_check:
        options.on_check(result)
    return result


def build_table(
    weights: Weights, planned: Plan, options: ConvertOptions
) -> tuple[TokenLocal, dict[str, torch.dtype], torch.dtype, dict]:
    """The row builder, each block's stored dtype, the table's dtype and the record."""
    model = weights.model
    model_dtype = model.get_submodule(planned.parts.embedding).weight.dtype
    dtype = options.dtype or model_dtype
    table_dtype = options.table_dtype or dtype
    dtypes = block_dtypes(table_dtype, dtype, planned.layout.is_parallel)
    token_local = TokenLocal(
        model, planned.parts, planned.layout, embedding_weight=weights.embedding_weight
    )
    record = table_record(
        planned.model_type,
        planned.parts,
        planned.layout,
        planned.lm_head_reads_table,
        table_dtype,
        dtypes["residual"],
    )
    # A multimodal model's image positions always need them.
    if options.keep_layer0 or family_of(planned.model_type).is_multimodal:
        record["kept_layer0"] = kept_layer0_record(model, planned, dtype)
    return token_local, dtypes, table_dtype, record


def kept_layer0_record(model: nn.Module, planned: Plan, dtype: torch.dtype) -> dict:
    """What a folder converted with `keep_layer0` keeps for embedding inputs, and what it costs:
    layer 0's q/k/v projections, whole, stored in `dtype` (its attention norm, which the table
    module keeps in every serial folder, costs nothing more)."""
    parts, layout = planned.parts, planned.layout
    why = None
    if layout.is_parallel:
        why = (
            "its layer 0 is a parallel block, whose MLP reads x too and is in the table's rows; "
            "only serial blocks keep layer 0 for embedding inputs"
        )
    elif parts.head_norms:
        why = "its table holds q and k after their norms"
    elif getattr(model.config, "quantization_config", None):
        why = "it is quantized, and its layer-0 projections would be kept quantized"
    modules = [model.get_submodule(name) for name in parts.projections]
    if why is None and not all(type(m) is nn.Linear for m in modules):
        why = "its layer-0 projections are not plain Linear modules"
    if why is not None and family_of(planned.model_type).is_multimodal:
        raise FirstLayerError(
            f"a {planned.model_type} model keeps layer 0's q/k/v for its image positions, but "
            f"{why}: convert an unquantized checkpoint"
        )
    if why is not None:
        raise FirstLayerError(
            f"keep_layer0 (--keep-layer0) on a {planned.model_type} model: {why}; convert it "
            "without the option (it then takes token ids only)"
        )
    count = sum(p.numel() for m in modules for p in m.parameters())
    return {
        "modules": list(parts.projections),
        "parameters": count,
        "bytes": count * dtype.itemsize,
    }


# --- the entry points -----------------------------------------------------------------------


def precompute(
    model: nn.Module,
    dtype: torch.dtype | str | None = None,
    progress: Progress | None = None,
    options: ConvertOptions | None = None,
    **settings: Any,
) -> nn.Module:
    """Replace a loaded causal LM's input embedding with the precomputed table, in place, and
    make it its family's precomputed class: `save_pretrained` then writes a folder that
    `AutoModelForCausalLM.from_pretrained` loads. Returns the model.

    The table is computed in float32 (float64 for a float64 model) from the model's own weights
    and stored in `dtype` (default: the embedding's dtype; int8 keeps per-row scales), but for a
    serial row's first D columns, the embedding itself, which stay in the model's dtype. Layer
    0's q/k/v weights and its attention norm (for parallel blocks also its MLP and MLP norm) are
    dropped, unless `keep_layer0` (a setting, as for `convert`) keeps the q/k/v for embedding
    inputs. `progress(done_rows, total_rows)` is called after each chunk.
    """
    options = ConvertOptions.of(options, table_dtype=dtype, progress=progress, **settings)
    planned = plan_for(model)
    weights = loaded_weights(model)
    model_dtype = weights.embedding_weight.dtype
    options = dataclasses.replace(options, dtype=model_dtype)
    token_local, dtypes, table_dtype, record = build_table(weights, planned, options)
    vocab_size = weights.embedding_weight.shape[0]
    sink = MemorySink(planned.layout, dtypes, vocab_size, weights.embedding_weight.device)
    sink.write(table_rows(token_local, planned.layout, dtypes, vocab_size, options.progress))
    del token_local
    self_check(weights, planned, sink.read, table_dtype, options, record)
    parts, layout = planned.parts, planned.layout
    patch_as_recorded(model, parts, layout, record, sink.blocks, sink.scales, model_dtype)
    return adopt(model, record)


def convert(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any | None = None,
    options: ConvertOptions | None = None,
    **settings: Any,
) -> Path:
    """Write the precomputed twin of a loaded model to `out`, streaming the table to disk.

    The model is left untouched and no whole table is ever held in memory, so peak memory stays
    close to the model's own size. Settings (or `options`, `ConvertOptions`): `dtype` the stored
    weights' dtype, `table_dtype` the table's (default `dtype`; float32, bfloat16, float16 or
    int8), `max_shard_size` (shards with an index, as save_pretrained writes), `force`,
    `progress`, `on_check` (receives the self-check), `accept_error` (publish a table whose rows
    miss their dtype's bound, `convert.selfcheck.RELATIVE_TOLERANCE`). Returns the folder.
    """
    plan_for(model)  # refuses a precomputed model before anything is read
    options = ConvertOptions.of(options, **settings)
    if options.adapters:  # merged into a copy: the model is left untouched
        model = merge_adapters(copy.deepcopy(model), list(options.adapters))
    return write_converted(loaded_weights(model, tokenizer), out, options)


def write_converted(weights: Weights, out: str | Path, options: ConvertOptions) -> Path:
    """The folder sink: the table's rows and every kept weight streamed into sharded files in a
    temporary folder, the self-check on the files, then the folder published."""
    model = weights.model
    planned = plan_for(model, from_checkpoint=weights.checkpoint is not None)
    parts, layout = planned.parts, planned.layout
    model_dtype = model.get_submodule(parts.embedding).weight.dtype
    dtype = options.dtype or model_dtype
    quantization = None
    if weights.checkpoint is not None:
        quantization = quantized_config(weights.checkpoint, planned, dtype, model_dtype)
    token_local, dtypes, table_dtype, record = build_table(weights, planned, options)
    if quantization is not None:
        record["quantization"] = quantization.record
    record["source_fingerprint"] = weights.fingerprint
    vocab_size = weights.embedding_weight.shape[0]
    if options.adapters:
        record["adapters"] = adapters_record(options.adapters)
    dropped = {f"{parts.lm_head}.weight"} if planned.lm_head_reads_table else set()
    kept_modules = kept_layer0(record)  # stay under the original's names
    eliminated = (
        parts.embedding,
        *(m for m in parts.eliminated(layout.is_parallel) if m not in kept_modules),
    )
    kept = weights.as_stored(as_saved(model, kept_weights(model, eliminated, dropped)))
    # A serial model's attention norm moves into the table module (`hf.patch.AdapterInput`).
    kept_norm = {}
    if keeps_attn_norm(record):
        norm = model.get_submodule(parts.attn_norm).state_dict()
        kept_norm = {f"{parts.embedding}.attn_norm.{k}": t for k, t in norm.items()}
    kept = {**kept_norm, **kept}
    # A serial table's residual block is the embedding itself: one mlx-lm quantized stays so.
    residual_parts = verbatim_embedding(weights, planned)
    if residual_parts:
        record["table"]["residual_dtype"] = MLX_QUANTIZED_BLOCK
    specs = []
    for block in BLOCKS:
        name = f"{parts.embedding}.{block}"
        if block == "residual" and residual_parts:
            for part, (_, meta) in residual_parts.items():
                specs.append(TensorSpec(f"{name}.{part}", meta.dtype, tuple(meta.shape)))
            continue
        specs.append(TensorSpec(name, dtypes[block], (vocab_size, layout.block_width(block))))
        if dtypes[block] == torch.int8:
            shape = (vocab_size, len(segments(layout, block)))
            specs.append(TensorSpec(name + SCALE_SUFFIX, torch.float32, shape))

    def stored_dtype(name: str, tensor: Tensor) -> torch.dtype:
        return tensor.dtype if weights.verbatim(name) else cast_dtype(tensor, dtype)

    specs += [TensorSpec(name, stored_dtype(name, t), tuple(t.shape)) for name, t in kept.items()]

    def table() -> Iterator[tuple[str, Tensor]]:
        rows = table_rows(token_local, layout, dtypes, vocab_size, options.progress)
        for block, _, stored, scales in rows:
            if block == "residual" and residual_parts:
                continue
            yield f"{parts.embedding}.{block}", stored
            if scales is not None:
                yield f"{parts.embedding}.{block}{SCALE_SUFFIX}", scales
        for part, (stored_name, _) in residual_parts.items():  # byte for byte
            for chunk in weights.checkpoint.folder.row_blocks(stored_name, COPY_BLOCK_BYTES):
                yield f"{parts.embedding}.residual.{part}", chunk

    def copies() -> Iterator[tuple[str, Tensor]]:  # runs beside the table, in a thread
        for name, tensor in kept.items():
            blocks = iter((tensor,)) if name in kept_norm else weights.blocks(name, tensor)
            for rows in blocks:
                yield name, rows.to(stored_dtype(name, rows))

    def check_rows(tmp: Path) -> None:
        read = folder_reader(tmp, parts.embedding, layout.hidden_size)
        self_check(weights, planned, read, table_dtype, options, record)

    def save_extras(tmp: Path) -> None:
        if weights.tokenizer is not None:
            weights.tokenizer.save_pretrained(tmp)
        copy_processor_files(weights.folder, tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)

    def save_config(tmp: Path) -> None:
        config = quantization.config if quantization is not None else None
        saved = saved_config(model, record, dtype, config)
        saved.model_file = MLX_MODEL_FILE  # what mlx-lm imports to build the model
        if config is not None and config["quant_method"] == MLX_METHOD:
            # mlx-lm reads its own key; the method named in quantization_config makes
            # transformers and vLLM refuse the folder by it.
            saved.quantization = {k: v for k, v in config.items() if k != "quant_method"}
        saved.save_pretrained(tmp)

    def write(tmp: Path) -> None:
        streams = [table(), copies()]
        write_folder(
            tmp,
            record,
            specs,
            streams,
            options.max_shard_size,
            check_rows,
            save_extras,
            save_config,
        )

    return publish(Path(out), options.force, write)


# What a converted folder's record says when its scheme quantizes layer 0's inputs too: the rows
# hold what the quantized kernels compute (`conversion.quantized.InputQuantization`).
INPUTS_QUANTIZED_AS = {
    "vllm": "as vLLM's int8 and FP8 kernels do (per token, per group or by the stored scale)",
    "transformers": "in the model's dtype, as transformers runs the scheme",
}


@dataclass(frozen=True)
class QuantizedOutput:
    config: dict[str, Any]  # the converted folder's quantization_config
    record: dict[str, Any]  # what the record says about it


def quantized_config(
    checkpoint: Checkpoint, planned: Plan, dtype: torch.dtype, model_dtype: torch.dtype
) -> QuantizedOutput:
    """A quantized source's converted quantization_config: layer 0's eliminated Linears marked
    unquantized. Its tensors are copied as stored, so the folder keeps the source's dtype."""
    if dtype != model_dtype:
        raise FirstLayerError(
            f"a quantized checkpoint is converted in its own dtype ({model_dtype}), its scales "
            f"and quantized tensors as stored: leave out --dtype {dtype}"
        )
    eliminated = planned.parts.eliminated(planned.layout.is_parallel)
    method = checkpoint.quantization["quant_method"]
    if method == MLX_METHOD:  # mlx-lm quantizes the embedding too
        eliminated = (planned.parts.embedding, *eliminated)
    dequantized = sorted(m for name in eliminated for m in checkpoint.quantized_in(name))
    # Marked by the names the config's method uses: mlx-lm's paths for its per-module settings.
    marked = [checkpoint.mlx_paths.get(m, m) for m in dequantized]
    config = converted_quantization_config(checkpoint.quantization, marked)
    record = {"method": method, "dequantized_into_the_table": dequantized}
    if checkpoint.inputs_quantized:
        record["quantized_for"] = checkpoint.quantized_for
        record["inputs_quantized"] = INPUTS_QUANTIZED_AS[checkpoint.quantized_for]
    return QuantizedOutput(config, record)


# What a multimodal checkpoint's processor reads beside the tokenizer: copied as they are.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def copy_processor_files(source: Path | None, out: Path) -> None:
    """The source folder's processor files (image processor, chat template), byte for byte."""
    for name in PROCESSOR_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def cast_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is stored in: `dtype` for floating-point weights, its own otherwise."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def kept_weights(
    model: nn.Module, drop: tuple[str, ...], dropped_names: set[str]
) -> dict[str, Tensor]:
    """The model's state dict without the modules in `drop` and the names in `dropped_names`."""
    prefixes = tuple(f"{name}." for name in drop)
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(prefixes) and name not in dropped_names
    }


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    tokenizer: Any | None = None,
    options: ConvertOptions | None = None,
    **settings: Any,
) -> Path:
    """`convert` for a safetensors folder (sharded or not) that is never loaded: the same
    folder, byte for byte, in memory that does not grow with the model's depth; plain LoRA
    adapters (`adapters`) merged into the weights as they are read. Raises NeedsLoading for a
    checkpoint whose weights transformers combines on loading, or adapters that PEFT must merge
    into a loaded model (DoRA, biases, embeddings, modules saved whole)."""
    options = ConvertOptions.of(options, **settings)
    refuse_quantized(config_quantization(resolve_source(str(source)).config), str(source))
    deltas = None
    if options.adapters:
        deltas = plain_lora_deltas(list(options.adapters))
        if deltas is None:
            raise NeedsLoading("these adapters are merged by PEFT into a loaded model")
    weights = checkpoint_weights(Path(source), tokenizer, deltas, options.quantized_for)
    refuse_larger_vocabulary(tokenizer, weights.model, Path(source))
    return write_converted(weights, out, options)


def convert_source(
    spec: str, out: str | Path, options: ConvertOptions | None = None, **settings: Any
) -> tuple[Path, str]:
    """Convert SOURCE as `firstlayer convert` does: a safetensors folder out of core, anything
    else (a GGUF file, which must be dequantized; a checkpoint whose weights transformers
    combines on loading) loaded first. Returns the folder and how it was read."""
    options = ConvertOptions.of(options, **settings)
    path = Path(spec)
    if path.is_dir() and any(path.glob("*.safetensors")) and not is_precomputed_folder(path):
        source = resolve_source(spec)  # refuses a folder without a usable config.json
        family_of(source.config["model_type"])
        quantization = config_quantization(source.config)
        refuse_quantized(quantization, spec)
        if quantization_method(quantization) != MLX_METHOD:  # packed under `.weight`: checked
            refuse_mismatched_shapes(path, source.config)  # as they are read instead
        try:
            return convert_checkpoint(path, out, load_tokenizer(path), options), "out of core"
        except NeedsLoading:
            pass  # Mixtral's experts (fused on loading), or adapters beyond plain LoRA
    loaded = load_source(spec, to_convert=True)
    model = loaded.model
    plan_for(model)  # refuses a precomputed model before anything is merged
    if options.adapters:  # into the model loaded for this conversion: no copy
        model = merge_adapters(model, list(options.adapters))
    weights = loaded_weights(model, loaded.tokenizer)
    weights.folder = path if path.is_dir() else None
    written = write_converted(weights, out, options)
    return written, "loaded in memory"


def check_folder_rows(
    source: str | Path, out: str | Path, count: int | None = None, adapters: tuple = ()
) -> SelfCheck:
    """The conversion's self-check on a written folder: `count` table rows read back from OUT
    against SOURCE's own layer 0 (with plain LoRA `adapters` merged), loading neither whole model
    (SOURCE: a safetensors folder)."""
    record = read_record(out)
    deltas = plain_lora_deltas([Path(a) for a in adapters]) if adapters else None
    if adapters and deltas is None:
        raise FirstLayerError(
            "verify --rows merges plain LoRA adapters only: leave out --rows to compare the "
            "loaded models"
        )
    checkpoint = meta_model(Path(source), deltas)
    model = checkpoint.model
    parts, _ = parts_of(model, record)
    layout = TableLayout.from_dict(record["table"])
    for module_name in token_local_modules(model, record):
        materialize(checkpoint, module_name)
    quantize_layer0_inputs(checkpoint, record.get("quantization", {}).get("quantized_for", "vllm"))
    model_dtype = model.get_submodule(parts.embedding).weight.dtype
    embedding = embedding_rows(checkpoint, parts.embedding, model_dtype)
    vocab_size = embedding.shape[0]
    ids = sample_ids(vocab_size, special_token_ids(model.config, None), count or SAMPLE_ROWS)
    expected = layer0_reference(model, parts, layout, lambda i: rows_at(embedding, i), ids)
    read = folder_reader(Path(out), record["table"]["module"], layout.hidden_size)
    table_dtype = TABLE_DTYPES[record["table"]["dtype"]]
    tolerance = tolerance_for(table_dtype, model_dtype)
    return compare_rows(stored_rows(read, ids, layout), expected, ids, layout, tolerance)
