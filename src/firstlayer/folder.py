"""The folder format: a precomputed model as a self-contained Hugging Face folder.

    config.json            the source config as `firstlayer_<family>`, with a `firstlayer`
                           record: format version, family, blocks, table layout and dtypes,
                           eliminated modules, source fingerprint, size and sha256 of every file
    model.safetensors      the table and every weight still needed, none of the eliminated ones
                           (or shards with model.safetensors.index.json)
    firstlayer_mlx.py      the model class mlx-lm imports (the config's `model_file`, with
                           trust_remote_code): firstlayer's, or a refusal naming it
    tokenizer, generation_config.json

A folder is written into a temporary sibling and renamed into place only when complete, so a
failed or killed conversion never leaves a folder that loads; the config is written last. The
history of the format versions is in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from firstlayer.errors import FirstLayerError
from firstlayer.families import Parts
from firstlayer.safetensors_io import (
    INDEX_NAME,
    WEIGHTS_NAME,
    MappedFile,
    TensorSpec,
    map_tensor,
    read_header,
    write_sharded,
)
from firstlayer.table.codec import dtype_name
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, TableLayout

# A serial folder whose table holds q and k before layer 0's q/k norms, which the model keeps and
# runs, is format 6 (a reader of format 5 would run it without them); one whose table module
# keeps layer 0's attention norm is format 5 (its int8 tables as format 4's); one with an int8
# table and no kept norm is format 4 (a fused projection's scales per head); every other folder
# is written as format 2, which it still is, so that older readers keep reading it.
# docs/formats.md has the history.
FORMAT_VERSION = 6
ATTN_NORM_FORMAT = 5
INT8_TABLE_FORMAT = 4
PLAIN_TABLE_FORMAT = 2
READABLE_FORMATS = (PLAIN_TABLE_FORMAT, INT8_TABLE_FORMAT, ATTN_NORM_FORMAT, FORMAT_VERSION)
# What an adapter's layer-0 part reads, norm(x): the attention norm the table module keeps
# (`<embedding>.attn_norm`), or x itself where layer 0 norms only after attention. A parallel
# block's rows hold x + mlp(x), so it has none.
ADAPTER_INPUTS = ("attn_norm", "x")
# Where layer 0's q/k norms (Qwen3, Gemma 3, OLMo 2, ...) run, in the record's `head_norms`:
# "at_run_time", the table holding q and k before them (a serial folder of format 6: an
# adapter's change to q or k enters before the norm, as in the original); absent, folded into the
# table's q/k columns (a parallel block, whose q/k take no adapter, and folders before format 6).
HEAD_NORMS_AT_RUN_TIME = "at_run_time"
WEIGHTS_FILE = WEIGHTS_NAME
HASH_BLOCK_BYTES = 1 << 24
# mlx-lm builds a model from the module its config names as `model_file` (only when trusted),
# and `mlx_lm.convert` copies every *.py file into its output, so this one travels along.
MLX_MODEL_FILE = "firstlayer_mlx.py"
MLX_MODEL_SOURCE = '''"""A firstlayer precomputed model (arXiv 2402.13388) in mlx-lm: mlx-lm's own
model class of the family with layer 0 read from the table, by firstlayer.mlx."""

try:
    from firstlayer.mlx.models import Model, ModelArgs  # noqa: F401
except ImportError as error:
    raise ImportError(
        "this folder is a firstlayer precomputed model, which mlx-lm runs with firstlayer's "
        f"model classes ({error}): pip install 'firstlayer[mlx]'"
    ) from error
'''


def table_record(
    model_type: str,
    parts: Parts,
    layout: TableLayout,
    lm_head_reads_table: bool,
    table_dtype: torch.dtype,
    residual_dtype: torch.dtype | None = None,
) -> dict:
    """The `firstlayer` section of a precomputed model's config. `table_dtype` is the qkv
    block's, `residual_dtype` the residual block's (default the same)."""
    adapter_input = adapter_input_of(parts, layout)
    if parts.run_head_norms:
        version = FORMAT_VERSION
    elif adapter_input == "attn_norm":
        version = ATTN_NORM_FORMAT
    else:
        version = INT8_TABLE_FORMAT if table_dtype == torch.int8 else PLAIN_TABLE_FORMAT
    return {
        "format_version": version,
        "model_type": model_type,
        "architecture": "parallel" if layout.is_parallel else "serial",
        "table": {
            "module": parts.embedding,
            **layout.to_dict(),
            "dtype": dtype_name(table_dtype),
            "residual_dtype": dtype_name(residual_dtype or table_dtype),
        },
        # Serial models with a tied LM head read the table's x block: one copy of E on disk.
        "lm_head": {"module": parts.lm_head, "reads_table": lm_head_reads_table},
        "eliminated": list(parts.eliminated(layout.is_parallel)),
        **({"adapter_input": adapter_input} if adapter_input else {}),
        **({"head_norms": HEAD_NORMS_AT_RUN_TIME} if parts.run_head_norms else {}),
    }


def adapter_input_of(parts: Parts, layout: TableLayout) -> str | None:
    """What a serial model keeps for an adapter's layer-0 part (`ADAPTER_INPUTS`), or None."""
    if layout.is_parallel:
        return None
    return "attn_norm" if parts.attn_norm is not None else "x"


def head_norms_in_table(record: dict | None, is_parallel: bool) -> bool:
    """Whether a table holds q and k after layer 0's q/k norms: as its folder's record says, or,
    for a table not written yet (`record` None), as a conversion writes it now: folded for
    parallel blocks, at run time for serial ones."""
    if record is None:
        return is_parallel
    return record.get("head_norms") != HEAD_NORMS_AT_RUN_TIME


def keeps_attn_norm(record: dict) -> bool:
    """Whether a folder's table module holds layer 0's attention norm."""
    return record.get("adapter_input") == "attn_norm"


def kept_layer0(record: dict) -> tuple[str, ...]:
    """The layer-0 projections a folder keeps with their weights, under the original's names, for
    positions fed by an embedding (converted with `keep_layer0`); () where it keeps none."""
    return tuple(record.get("kept_layer0", {}).get("modules", ()))


# --- writing --------------------------------------------------------------------------------


def publish(out: str | Path, force: bool, write: Callable[[Path], None]) -> Path:
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


def write_folder(
    tmp: Path,
    record: dict,
    specs: list[TensorSpec],
    streams: list[Iterator[tuple[str, Tensor]]],
    max_shard_size: int | str,
    check_rows: Callable[[Path], None],
    save_extras: Callable[[Path], None],
    save_config: Callable[[Path], None],
) -> None:
    """The weights, then the self-check on them (`check_rows`), the tokenizer and generation
    config (`save_extras`), the record of every file, and the config last (`save_config`, which
    writes `record`). `record["source_fingerprint"]` may be a callable, known once the weights
    have streamed."""
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
    save_extras(tmp)
    (tmp / MLX_MODEL_FILE).write_text(MLX_MODEL_SOURCE)
    # Every file but the config itself, so that `check` notices any edited or swapped one.
    names = [f.name for f in tmp.iterdir() if f.is_file() and f.name != "config.json"]
    record["files"] = record_files(tmp, names)
    save_config(tmp)  # a folder without its config is not a model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def record_files(folder: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in sorted(names)
    }


def record_weight_files(folder: Path, config: Any) -> None:
    """After save_pretrained: the weight files' sizes and checksums into the config's record."""
    names = [name for name in weight_files_of(folder) if (folder / name).is_file()]
    config.firstlayer = {**config.firstlayer, "files": record_files(folder, names)}
    config.save_pretrained(folder)


# --- reading --------------------------------------------------------------------------------


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


def is_precomputed_folder(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return bool(json.loads(config.read_text()).get("firstlayer"))
    except json.JSONDecodeError:
        return False


def read_record(path: str | Path) -> dict:
    """The `firstlayer` record of a folder's config.json, refusing what is not a precomputed
    folder of a format this version reads."""
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
        *others, last = (str(v) for v in READABLE_FORMATS)
        readable = f"{', '.join(others)} and {last}"
        raise FirstLayerError(
            f"{path} has firstlayer format {record.get('format_version')}, this version reads "
            f"{readable}: convert the source again with `firstlayer convert`"
        )
    return record


def require_files(path: str | Path) -> dict:
    """What every load checks first: a precomputed folder of a readable format, with every file
    it recorded present at its recorded size and no weight file it did not record. Returns the
    record."""
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


def mapped_table(folder: Path, record: dict) -> tuple[dict[str, Tensor], tuple[MappedFile, ...]]:
    """The table blocks a loaded model reads from the folder's files, memory-mapped in their
    stored dtype (copy-on-write: nothing in the process can write to the file): the qkv block,
    a parallel model's residual block, and int8 scales. A serial model's residual block is its
    embedding and tied LM head, which the model holds like any weight. Returns them by their
    name in the table module, and the files they map."""
    entries: dict[str, tuple] = {}
    for name in weight_files_of(folder):
        if name.endswith(".safetensors"):
            entries.update(read_header(folder / name))
    blocks = BLOCKS if record["architecture"] == "parallel" else ("qkv",)
    mapped, paths = {}, set()
    for block in blocks:
        for name in (block, block + SCALE_SUFFIX):
            key = f"{record['table']['module']}.{name}"
            if key not in entries:
                continue  # a block that is not int8 has no scales
            path, dtype, shape, offset = entries[key]
            mapped[name] = map_tensor(path, dtype, shape, offset)
            paths.add(path)
    return mapped, tuple(MappedFile(path) for path in sorted(paths))


def check(path: str | Path) -> list[str]:
    """Recompute every checksum of a converted folder; FirstLayerError on the first mismatch.

    Returns one line per check that passed.
    """
    path = Path(path)
    record = require_files(path)
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
