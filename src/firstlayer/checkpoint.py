"""A precomputed model as a self-contained folder: config.json with a `firstlayer` section,
model.safetensors (the table and every weight still needed, none of the eliminated ones), the
tokenizer and the generation config. Written into a temporary sibling and renamed into place only
when complete, so a failed or killed conversion never leaves a folder that loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.rowcheck import (
    RowCheck,
    compare_rows,
    layer0_reference,
    require,
    sample_ids,
    special_token_ids,
    stored_rows,
    tolerance_for,
)
from firstlayer.runtime import READABLE_FORMATS, firstlayer_record, plan
from firstlayer.safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    WEIGHTS_NAME,
    MappedFile,
    SafetensorsFolder,
    TensorSpec,
    map_tensor,
    read_header,
    write_sharded,
)
from firstlayer.table import (
    BLOCKS,
    SCALE_SUFFIX,
    TABLE_DTYPES,
    TokenLocal,
    block_dtypes,
    encode_rows,
    segments,
    table_chunks,
)

WEIGHTS_FILE = WEIGHTS_NAME
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HASH_BLOCK_BYTES = 1 << 24


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise FirstLayerError(f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_table_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in TABLE_DTYPES:
        raise FirstLayerError(
            f"table dtype {name!r} is not supported: use one of {', '.join(TABLE_DTYPES)}"
        )
    return TABLE_DTYPES[name]


def tensor_sha256(tensor: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(memoryview(tensor_bytes(tensor)))
    return digest.hexdigest()


def tensor_bytes(tensor: Tensor) -> Any:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def fingerprint(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], str]]) -> str:
    """sha256 over (name, dtype, shape, sha256 of the bytes) of every weight, in name order:
    identifies a source model, and can be computed one tensor at a time in any order."""
    digest = hashlib.sha256()
    for name, dtype, shape, data_sha256 in sorted(entries):
        digest.update(f"{name}:{dtype}:{shape}:{data_sha256};".encode())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """The fingerprint of a loaded model's state dict (tied weights under each of their names)."""
    return fingerprint(
        (name, t.dtype, tuple(t.shape), tensor_sha256(t)) for name, t in model.state_dict().items()
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _cast_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is stored in: `dtype` for floating-point weights, its own otherwise."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(_cast_dtype(tensor, dtype))


def _kept_weights(
    model: nn.Module, drop: tuple[str, ...], dropped_names: set[str]
) -> dict[str, Tensor]:
    """The model's state dict without the modules in `drop` and the names in `dropped_names`."""
    prefixes = tuple(f"{name}." for name in drop)
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(prefixes) and name not in dropped_names
    }


def weight_conversions(model: nn.Module) -> list:
    """transformers' renaming and combining rules between this model's checkpoint names and its
    state dict (`embed_out.` -> `lm_head.`, Mixtral's experts fused into one tensor)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers < 5.24 keeps it beside the transforms
        from transformers.core_model_loading import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model))


def as_saved(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights as save_pretrained writes them: where transformers combines checkpoint tensors
    on loading (Mixtral's experts), split again, so that every reader of checkpoints (vLLM's
    loaders among them) finds the names and shapes it knows."""
    from transformers.core_model_loading import WeightConverter, revert_weight_conversion

    if not any(isinstance(t, WeightConverter) for t in weight_conversions(model)):
        return weights
    return dict(revert_weight_conversion(model, weights))


def _saved_config(model: nn.Module, record: dict, dtype: torch.dtype) -> Any:
    """The source's config as its family's precomputed config class, with the record."""
    from firstlayer.hf import config_class, model_class

    family = record["model_type"]
    config = copy.deepcopy(model.config)
    # A GGUF checkpoint arrives dequantized; the folder holds plain tensors.
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.__class__ = config_class(family)
    config.architectures = [model_class(family).__name__]
    # Only a serial model's LM head stays tied, to the table's residual block.
    config.tie_word_embeddings = bool(record["lm_head"]["reads_table"])
    config.dtype = str(dtype).removeprefix("torch.")
    config.firstlayer = record
    return config


def _publish(out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary sibling of `out`, then rename it into place."""
    out = Path(out)
    if out.exists() and not force and not _is_empty_folder(out):
        raise FirstLayerError(f"{out} exists: choose another output folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = out.parent / f".{out.name}.firstlayer-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.firstlayer-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:  # Ctrl-C included: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _remove_abandoned(out: Path) -> None:
    """Delete temporary siblings of `out` left by conversions that were killed (SIGKILL)."""
    for tmp in out.parent.glob(f".{out.name}.firstlayer-*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _is_running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in sorted(names)
    }


def _write_folder(
    tmp: Path,
    model: nn.Module,
    record: dict,
    dtype: torch.dtype,
    specs: list[TensorSpec],
    streams: list[Iterator[tuple[str, Tensor]]],
    tokenizer: Any | None,
    max_shard_size: int | str,
    check_rows: Callable[[Path], None],
) -> None:
    """The weights (then the self-check on them), tokenizer, generation config, config last.
    `record["source_fingerprint"]` may be a callable, known once the weights have streamed."""
    fingerprint = record["source_fingerprint"]
    if callable(fingerprint):
        metadata = {"format": "pt", "firstlayer_source": "0" * 64}

        def final_metadata() -> dict[str, str]:
            record["source_fingerprint"] = fingerprint()
            return {**metadata, "firstlayer_source": record["source_fingerprint"]}

        write_sharded(tmp, specs, streams, metadata, max_shard_size, final_metadata)
    else:
        metadata = {"format": "pt", "firstlayer_source": fingerprint}
        write_sharded(tmp, specs, streams, metadata, max_shard_size)
    check_rows(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    # Every file but the config itself, so that `check` notices any edited or swapped one.
    names = [f.name for f in tmp.iterdir() if f.is_file() and f.name != "config.json"]
    record["files"] = _record_files(tmp, names)
    # The config goes last: a folder without it is not a model.
    _saved_config(model, record, dtype).save_pretrained(tmp)


@dataclass
class Weights:
    """Where a conversion reads the source's weights: a loaded model's tensors, or a checkpoint
    read a tensor (a block of rows) at a time (`firstlayer.streaming`)."""

    embedding_weight: Any  # (V, D) rows by index, in the model's dtype
    blocks: Callable[[str, Tensor], Iterator[Tensor]]  # a kept weight, as blocks of rows
    fingerprint: str | Callable[[], str]  # a callable when known only after the stream

    def embedding_rows(self, ids: Tensor) -> Tensor:
        return rows_at(self.embedding_weight, ids)


def rows_at(weight: Any, ids: Tensor) -> Tensor:
    """Rows `ids` of a weight that may only be read in ranges (one from disk)."""
    return torch.cat([weight[i : i + 1] for i in ids.tolist()])


def convert(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    on_check: Callable[[RowCheck], None] | None = None,
    table_dtype: torch.dtype | str | None = None,
    accept_error: bool = False,
) -> Path:
    """Write the precomputed twin of a loaded model to `out`, streaming the table to disk.

    The model is left untouched and no whole table is ever held in memory, so peak memory stays
    close to the model's own size. Weights above `max_shard_size` are split into shards with an
    index, as save_pretrained does. Before the folder is published, table rows read back from it
    are checked against the model's own layer 0 (`rowcheck`); `on_check` receives the result.
    `dtype` is the stored weights' dtype, `table_dtype` the table's (default `dtype`; float32,
    bfloat16, float16 or int8). A table whose rows miss their dtype's bound
    (`rowcheck.RELATIVE_TOLERANCE`) is refused unless `accept_error`. Returns the folder.
    """
    plan(model)  # refuses a precomputed model before anything is read
    weights = Weights(
        embedding_weight=model.get_input_embeddings().weight,
        blocks=lambda name, tensor: iter((tensor,)),
        fingerprint=weights_fingerprint(model),
    )
    return convert_weights(
        model,
        weights,
        out,
        tokenizer,
        dtype,
        force,
        progress,
        max_shard_size,
        on_check,
        table_dtype=table_dtype,
        accept_error=accept_error,
    )


def convert_weights(
    model: nn.Module,
    weights: Weights,
    out: str | Path,
    tokenizer: Any | None,
    dtype: torch.dtype | str | None,
    force: bool,
    progress: Callable[[int, int], None] | None,
    max_shard_size: int | str,
    on_check: Callable[[RowCheck], None] | None,
    table_dtype: torch.dtype | str | None = None,
    accept_error: bool = False,
) -> Path:
    """`convert` for a model whose weights `weights` supplies (the model may be on the meta
    device but for layer 0's token-local modules)."""
    parts, layout, lm_head_from_table = plan(model)
    model_dtype = model.get_submodule(parts.embedding).weight.dtype
    dtype = parse_dtype(dtype) or model_dtype
    table_dtype = parse_table_dtype(table_dtype) or dtype
    parallel = layout.is_parallel
    dtypes = block_dtypes(table_dtype, dtype, parallel)
    record = firstlayer_record(
        model, parts, layout, lm_head_from_table, table_dtype, dtypes["residual"]
    )
    record["source_fingerprint"] = weights.fingerprint
    token_local = TokenLocal(model, parts, layout, embedding_weight=weights.embedding_weight)
    vocab_size = token_local.embedding_weight.shape[0]
    dropped = {f"{parts.lm_head}.weight"} if lm_head_from_table else set()
    kept = as_saved(
        model, _kept_weights(model, (parts.embedding, *parts.eliminated(parallel)), dropped)
    )
    widths = {"residual": layout.hidden_size, "qkv": layout.qkv_width}
    specs = []
    for block in BLOCKS:
        name = f"{parts.embedding}.{block}"
        specs.append(TensorSpec(name, dtypes[block], (vocab_size, widths[block])))
        if dtypes[block] == torch.int8:
            shape = (vocab_size, len(segments(layout, block)))
            specs.append(TensorSpec(name + SCALE_SUFFIX, torch.float32, shape))
    specs += [TensorSpec(name, _cast_dtype(t, dtype), tuple(t.shape)) for name, t in kept.items()]

    def table() -> Iterator[tuple[str, Tensor]]:
        for index, block in enumerate(BLOCKS):
            name, ranges = f"{parts.embedding}.{block}", segments(layout, block)
            for start, rows in table_chunks(token_local, vocab_size, block):
                stored, scales = encode_rows(rows, dtypes[block], ranges)
                yield name, stored
                if scales is not None:
                    yield name + SCALE_SUFFIX, scales
                if progress:
                    progress(index * vocab_size + start + len(rows), len(BLOCKS) * vocab_size)

    def copies() -> Iterator[tuple[str, Tensor]]:  # runs beside the table, in a thread
        for name, tensor in kept.items():
            for rows in weights.blocks(name, tensor):
                yield name, _cast(rows, dtype)

    def check_rows(tmp: Path) -> None:
        ids = sample_ids(vocab_size, special_token_ids(model.config, tokenizer))
        expected = layer0_reference(model, parts, layout, weights.embedding_rows, ids)
        stored = stored_rows(SafetensorsFolder(tmp), parts.embedding, ids, layout)
        tolerance = tolerance_for(table_dtype, model_dtype)
        result = compare_rows(stored, expected, ids, layout, tolerance)
        if not result.passed and accept_error:
            # Published on request; the record says so, and `verify` repeats it.
            record["accepted_row_error"] = {"max": result.max_error, "tolerance": tolerance}
        else:
            require(result)
        if on_check:
            on_check(result)

    def write(tmp: Path) -> None:
        _write_folder(
            tmp,
            model,
            record,
            dtype,
            specs,
            [table(), copies()],
            tokenizer,
            max_shard_size,
            check_rows,
        )

    return _publish(Path(out), force, write)


def save(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any | None = None,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a precomputed model (from `precompute` or `load`) to a self-contained folder:
    save_pretrained into a temporary sibling, renamed into place when complete."""
    from firstlayer.hf.models import PrecomputedForCausalLM

    if not isinstance(model, PrecomputedForCausalLM):
        raise FirstLayerError("save() takes a precomputed model: call firstlayer.precompute first")

    def write(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        names = [f.name for f in tmp.iterdir() if f.is_file() and f.name != "config.json"]
        model.config.firstlayer["files"] = _record_files(tmp, names)
        model.config.save_pretrained(tmp)

    return _publish(Path(path), force, write)


def record_weight_files(folder: Path, config: Any) -> None:
    """After save_pretrained: the weight files' sizes and checksums into the config's record."""
    names = [name for name in weight_files_of(folder) if (folder / name).is_file()]
    config.firstlayer = {**config.firstlayer, "files": _record_files(folder, names)}
    config.save_pretrained(folder)


def weight_files_of(folder: Path) -> list[str]:
    """The safetensors files of a folder: those its index names, or model.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise FirstLayerError(
                f"{index} is not a valid index ({error}): convert again"
            ) from None
        return [*sorted(set(weight_map.values())), INDEX_NAME]
    return [WEIGHTS_FILE]


def read_record(path: str | Path) -> dict:
    """The `firstlayer` record of a folder's config.json, refusing what is not a precomputed
    folder of this format."""
    path = Path(path)
    if not path.exists():
        raise FirstLayerError(f"{path} does not exist: give the folder `firstlayer convert` wrote")
    if not (path / "config.json").is_file():
        raise FirstLayerError(
            f"{path} holds no config.json: give the folder `firstlayer convert` wrote"
        )
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise FirstLayerError(f"{path / 'config.json'} is not valid JSON ({error})") from None
    record = raw.get("firstlayer")
    if not record:
        raise FirstLayerError(
            f"{path} is not a precomputed model (its config has no `firstlayer` section): "
            "convert it with `firstlayer convert SOURCE OUT`"
        )
    if record.get("format_version") not in READABLE_FORMATS:
        readable = " and ".join(str(v) for v in READABLE_FORMATS)
        raise FirstLayerError(
            f"{path} has firstlayer format {record.get('format_version')}, this version reads "
            f"{readable}: convert the source again with `firstlayer convert`"
        )
    return record


def check_folder_files(path: str | Path) -> dict:
    """The cheap checks every load does: a precomputed folder of this format, with every file
    it recorded present at its recorded size. Returns the record."""
    path = Path(path)
    record = read_record(path)
    files = record.get("files", {})
    for name in weight_files_of(path):
        if name not in files and (path / name).is_file():
            raise FirstLayerError(
                f"{path / name} was not written by this conversion: convert again"
            )
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise FirstLayerError(f"{file} is missing: convert the source again")
        if file.stat().st_size != expected["bytes"]:
            raise FirstLayerError(
                f"{file} has {file.stat().st_size} bytes, the conversion wrote {expected['bytes']}"
                ": the file is truncated or was replaced; convert the source again"
            )
    return record


def save_source(model: nn.Module, folder: str | Path, tokenizer: Any | None = None) -> Path:
    """The source model as a plain Hugging Face folder (an engine's original, to compare with):
    save_pretrained, also for a model loaded from GGUF, whose dequantised tensors transformers
    refuses to save because the load went through its GGUF "quantizer"."""
    folder = Path(folder)
    quantizer = getattr(model, "hf_quantizer", None)
    quantization = getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if quantization is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            model.config.quantization_config = quantization
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# Where a loaded model's table lives (`load(..., table_memory=)`, `from_pretrained` likewise):
#   mapped  the folder's file, memory-mapped: on disk, pages resident only for rows read (default)
#   pinned  a copy in page-locked host memory, for fast copies of the rows to a CUDA device
#   device  where transformers puts every weight (device_map), in the model's dtype
TABLE_MEMORY = ("mapped", "pinned", "device")


def map_table(model: nn.Module, folder: Path, memory: str = "mapped") -> None:
    """Point a loaded model's table at the folder's files: the qkv block (and a parallel model's
    residual block), with int8 scales, memory-mapped in their stored dtype and kept in host
    memory whatever the model's dtype or device; each call converts only the rows it reads. A
    serial model's residual block is its embedding and tied LM head: transformers keeps it."""
    if memory not in TABLE_MEMORY:
        raise FirstLayerError(f"table_memory={memory!r} is not one of {', '.join(TABLE_MEMORY)}")
    if memory == "device":
        return
    if memory == "pinned" and not torch.cuda.is_available():
        raise FirstLayerError("table_memory='pinned' needs a CUDA device: use 'mapped' here")
    record = model.config.firstlayer
    table = model.get_input_embeddings()
    entries: dict[str, tuple] = {}
    for name in weight_files_of(folder):
        if name.endswith(".safetensors"):
            entries.update(read_header(folder / name))
    blocks = ("residual", "qkv") if record["architecture"] == "parallel" else ("qkv",)
    names = [block + suffix for block in blocks for suffix in ("", SCALE_SUFFIX)]
    files, mapped_names = set(), set()
    table.dtype = model.get_output_embeddings().weight.dtype
    for name in names:
        key = f"{record['table']['module']}.{name}"
        if key not in entries:
            continue  # a block that is not int8 has no scales
        path, dtype, shape, offset = entries[key]
        mapped = map_tensor(path, dtype, shape, offset)
        if memory == "pinned":
            mapped = mapped.pin_memory()
        setattr(table, name, nn.Parameter(mapped, requires_grad=False))
        files.add(path)
        mapped_names.add(name)
    table.files = tuple(MappedFile(path) for path in sorted(files)) if memory == "mapped" else ()
    table.host_blocks = frozenset(mapped_names)


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    table_memory: str = "mapped",
) -> nn.Module:
    """Load a precomputed model folder; needs nothing of the original checkpoint.

    The same as `AutoModelForCausalLM.from_pretrained(path, dtype=..., device_map=device,
    table_memory=...)` with firstlayer imported, with transformers' errors on damaged files
    turned into one clear line. See `TABLE_MEMORY` for where the table lives.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from firstlayer.hf import register

    register()
    check_folder_files(path)
    dtype = parse_dtype(dtype) or "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device, local_files_only=True, table_memory=table_memory
        )
    except FirstLayerError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        detail = " ".join(str(error).split())[:300]
        raise FirstLayerError(
            f"{path} cannot be loaded ({detail}): convert the source again"
        ) from None
    return model.eval()


def check(path: str | Path) -> list[str]:
    """Recompute every checksum of a converted folder; FirstLayerError on the first mismatch.

    Returns one line per check that passed.
    """
    from safetensors import safe_open

    path = Path(path)
    record = check_folder_files(path)
    files = record.get("files", {})
    lines = []
    for name, expected in files.items():
        if file_sha256(path / name) != expected["sha256"]:
            raise FirstLayerError(
                f"{path / name} does not match the checksum its conversion recorded: "
                "the file was edited, corrupted or taken from another conversion; convert again"
            )
        lines.append(f"{name}: sha256 ok ({expected['bytes']:,} bytes)")
    weights = [name for name in weight_files_of(path) if name.endswith(".safetensors")]
    unrecorded = [name for name in weights if name not in files]
    if unrecorded:
        raise FirstLayerError(f"{path}: config.json records no checksum of {unrecorded[0]}")
    module = record["table"]["module"]
    shapes, sources = {}, set()
    for name in weights:
        try:
            with safe_open(path / name, "pt") as handle:
                sources.add((handle.metadata() or {}).get("firstlayer_source"))
                names = set(handle.keys())
                for block in BLOCKS:
                    if f"{module}.{block}" in names:
                        shapes[block] = handle.get_slice(f"{module}.{block}").get_shape()
        except Exception as error:  # safetensors raises its own error types
            raise FirstLayerError(
                f"{path / name} cannot be read ({error}): convert again"
            ) from None
    # save_pretrained writes no fingerprint into the headers; a conversion writes it in each.
    sources.discard(None)
    if sources and sources != {record.get("source_fingerprint")}:
        raise FirstLayerError(
            f"{path}: the weights come from a conversion of another source than config.json "
            "says: the folder mixes two conversions; convert again"
        )
    if sources:
        lines.append(f"source fingerprint {next(iter(sources))[:16]}... matches config and weights")
    table = record["table"]
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    hidden, width = table["hidden_size"], table["width"]
    if [shapes.get(block) for block in BLOCKS] != [
        [vocab_size, hidden],
        [vocab_size, width - hidden],
    ]:
        raise FirstLayerError(
            f"{path}: the table blocks are {[shapes.get(b) for b in BLOCKS]}, the config asks for "
            f"[{vocab_size}, {hidden}] and [{vocab_size}, {width - hidden}]: convert again"
        )
    lines.append(f"table {vocab_size:,} x {width:,} matches the config and its layout")
    return lines
