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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.runtime import (
    FORMAT_VERSION,
    firstlayer_record,
    parts_of,
    patch,
    plan,
)
from firstlayer.safetensors_io import TensorSpec, write_safetensors
from firstlayer.table import BLOCKS, Layout, TokenLocal, table_chunks, table_layout

WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HASH_BLOCK_BYTES = 1 << 24


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise FirstLayerError(f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every named weight (name, dtype, shape, bytes): identifies the source model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        digest.update(memoryview(data))
    return digest.hexdigest()


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


def _saved_config(model: nn.Module, record: dict, dtype: torch.dtype) -> Any:
    config = copy.deepcopy(model.config)
    # A GGUF checkpoint arrives dequantized; the folder holds plain tensors.
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.tie_word_embeddings = False
    config.dtype = str(dtype).removeprefix("torch.")
    config.firstlayer = record
    return config


def _publish(out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary sibling of `out`, then rename it into place."""
    out = Path(out)
    if out.exists() and not force:
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


def _write_folder(
    tmp: Path,
    model: nn.Module,
    record: dict,
    dtype: torch.dtype,
    specs: list[TensorSpec],
    chunks: Iterator[tuple[str, Tensor]],
    tokenizer: Any | None,
) -> None:
    metadata = {"format": "pt", "firstlayer_source": record["source_fingerprint"]}
    write_safetensors(tmp / WEIGHTS_FILE, specs, chunks, metadata)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    # Every file but the config itself, so that `check` notices any edited or swapped one.
    record["files"] = {
        file.name: {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        for file in sorted(tmp.iterdir())
        if file.is_file() and file.name != "config.json"
    }
    # The config goes last: a folder without it is not a model.
    _saved_config(model, record, dtype).save_pretrained(tmp)


def convert(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the precomputed twin of a loaded model to `out`, streaming the table to disk.

    The model is left untouched and no whole table is ever held in memory, so peak memory stays
    close to the model's own size. Returns the folder.
    """
    parts, layout, lm_head_from_table = plan(model)
    dtype = parse_dtype(dtype) or model.get_input_embeddings().weight.dtype
    parallel = layout.is_parallel
    record = firstlayer_record(model, parts, layout, lm_head_from_table, dtype)
    record["source_fingerprint"] = weights_fingerprint(model)
    token_local = TokenLocal(model, parts, layout)
    vocab_size = token_local.embedding_weight.shape[0]
    dropped = {f"{parts.lm_head}.weight"} if lm_head_from_table else set()
    kept = _kept_weights(model, (parts.embedding, *parts.eliminated(parallel)), dropped)
    widths = {"residual": layout.hidden_size, "qkv": layout.qkv_width}
    specs = [
        TensorSpec(f"{parts.embedding}.{block}", dtype, (vocab_size, widths[block]))
        for block in BLOCKS
    ] + [TensorSpec(name, _cast_dtype(t, dtype), tuple(t.shape)) for name, t in kept.items()]

    def chunks() -> Iterator[tuple[str, Tensor]]:
        for index, block in enumerate(BLOCKS):
            for start, rows in table_chunks(token_local, vocab_size, block):
                yield f"{parts.embedding}.{block}", rows.to(dtype)
                if progress:
                    progress(index * vocab_size + start + len(rows), len(BLOCKS) * vocab_size)
        for name, tensor in kept.items():
            yield name, _cast(tensor, dtype)

    return _publish(
        Path(out),
        force,
        lambda tmp: _write_folder(tmp, model, record, dtype, specs, chunks(), tokenizer),
    )


def save(model: nn.Module, path: str | Path, tokenizer: Any | None = None, force: bool = False):
    """Write a precomputed model (from `precompute` or `load`) to a self-contained folder."""
    record = copy.deepcopy(getattr(model.config, "firstlayer", None))
    if not record:
        raise FirstLayerError("save() takes a precomputed model: call firstlayer.precompute first")
    dtype = model.get_parameter(f"{record['table']['module']}.residual").dtype
    record.setdefault("source_fingerprint", "unknown")
    lm_head = record["lm_head"]
    # A tied LM head is the table's residual block: stored once, under the table's name.
    dropped = {f"{lm_head['module']}.weight"} if lm_head["reads_table"] else set()
    kept = _kept_weights(model, (), dropped)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in kept.items()]
    chunks = iter(kept.items())
    return _publish(
        Path(path),
        force,
        lambda tmp: _write_folder(tmp, model, record, dtype, specs, chunks, tokenizer),
    )


@dataclass(frozen=True)
class FolderInfo:
    config: Any
    record: dict
    weights: Path


def read_folder(path: str | Path) -> FolderInfo:
    """The cheap checks `load` always does: a firstlayer folder of a known format, files present."""
    from transformers import AutoConfig

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
    if record.get("format_version") != FORMAT_VERSION:
        raise FirstLayerError(
            f"{path} has firstlayer format {record.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: convert the source again"
        )
    for name, expected in record.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise FirstLayerError(f"{file} is missing: convert the source again")
        if file.stat().st_size != expected["bytes"]:
            raise FirstLayerError(
                f"{file} has {file.stat().st_size} bytes, the conversion wrote {expected['bytes']}"
                ": the file is truncated or was replaced; convert the source again"
            )
    return FolderInfo(AutoConfig.from_pretrained(path), record, path / WEIGHTS_FILE)


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a precomputed model folder; needs nothing of the original checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    info = read_folder(path)
    record, module = info.record, info.record["table"]["module"]
    try:
        tensors = load_file(info.weights)
    except (SafetensorError, OSError) as error:
        raise FirstLayerError(
            f"{info.weights} cannot be read ({error}): convert the source again"
        ) from None
    names = [f"{module}.{block}" for block in BLOCKS]
    if any(name not in tensors for name in names):
        raise FirstLayerError(f"{info.weights} holds no table ({', '.join(names)}): convert again")
    dtype = parse_dtype(dtype) or tensors[names[0]].dtype
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(info.config, dtype=dtype)
    parts, parallel = parts_of(model)
    layout = table_layout(model, parts, parallel)
    if layout != Layout.from_dict(record["table"]):
        raise FirstLayerError(
            f"{path}: the table layout in config.json does not match the model the config "
            "describes: the folder was edited; convert the source again"
        )
    residual, qkv = (tensors.pop(name).to(dtype) for name in names)
    vocab_size = info.config.vocab_size
    for name, block, width in zip(
        names, (residual, qkv), (layout.hidden_size, layout.qkv_width), strict=True
    ):
        if tuple(block.shape) != (vocab_size, width):
            raise FirstLayerError(
                f"{info.weights}: {name} is {tuple(block.shape)}, the config asks for "
                f"({vocab_size}, {width}): the weights do not belong to this config"
            )
    lm_head_from_table = bool(record["lm_head"]["reads_table"])
    patch(model, parts, layout, residual, qkv, lm_head_from_table)
    try:
        missing, unexpected = model.load_state_dict(
            {name: _cast(t, dtype) for name, t in tensors.items()}, strict=False, assign=True
        )
    except RuntimeError as error:  # size mismatches
        detail = str(error).splitlines()[-1].strip()
        raise FirstLayerError(
            f"{info.weights}: weights disagree with the config ({detail}); convert again"
        ) from None
    allowed_missing = set(names) | ({f"{parts.lm_head}.weight"} if lm_head_from_table else set())
    missing = set(missing) - allowed_missing
    if missing or unexpected:
        raise FirstLayerError(
            f"{info.weights} does not match its config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}): convert the source again"
        )
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model.to(device) if device is not None else model


def check(path: str | Path) -> list[str]:
    """Recompute every checksum of a converted folder; FirstLayerError on the first mismatch.

    Returns one line per check that passed.
    """
    from safetensors import safe_open

    info = read_folder(path)
    lines = []
    for name, expected in info.record.get("files", {}).items():
        if file_sha256(Path(path) / name) != expected["sha256"]:
            raise FirstLayerError(
                f"{Path(path) / name} does not match the checksum its conversion recorded: "
                "the file was edited, corrupted or taken from another conversion; convert again"
            )
        lines.append(f"{name}: sha256 ok ({expected['bytes']:,} bytes)")
    if WEIGHTS_FILE not in info.record.get("files", {}):
        raise FirstLayerError(f"{path}: config.json records no checksum of {WEIGHTS_FILE}")
    try:
        with safe_open(info.weights, "pt") as weights:
            source = (weights.metadata() or {}).get("firstlayer_source")
            module = info.record["table"]["module"]
            shapes = [weights.get_slice(f"{module}.{block}").get_shape() for block in BLOCKS]
    except Exception as error:  # safetensors raises its own error types
        raise FirstLayerError(f"{info.weights} cannot be read ({error}): convert again") from None
    if source != info.record.get("source_fingerprint"):
        raise FirstLayerError(
            f"{path}: {WEIGHTS_FILE} comes from a conversion of another source than config.json "
            "says: the folder mixes two conversions; convert again"
        )
    lines.append(f"source fingerprint {source[:16]}... matches in config and weights")
    width = info.record["table"]["width"]
    hidden = info.record["table"]["hidden_size"]
    vocab_size = info.config.vocab_size
    if shapes != [[vocab_size, hidden], [vocab_size, width - hidden]]:
        raise FirstLayerError(
            f"{path}: the table blocks are {shapes}, the config asks for "
            f"[{vocab_size}, {hidden}] and [{vocab_size}, {width - hidden}]: convert again"
        )
    lines.append(f"table {vocab_size:,} x {width:,} matches the config and its layout")
    return lines
