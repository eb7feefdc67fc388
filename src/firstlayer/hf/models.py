"""A precomputed model as transformers classes: per family a config class and a causal-LM class,
subclasses of the family's own, registered with AutoConfig and AutoModelForCausalLM.

A converted folder says `model_type: firstlayer_<family>` and `architectures:
[FirstLayer<Family>ForCausalLM]`, names plain transformers and vLLM refuse, naming firstlayer,
instead of loading the folder as the original family with layer 0 re-initialised at random. With
firstlayer imported, `from_pretrained` builds the family's model (on the meta device, as always),
`post_init` swaps layer 0's token-local modules for an empty table of the recorded layout, and
transformers' own loader fills it: dtype="auto", device_map, sharded folders and save_pretrained
work as for any model.

transformers is imported inside the functions only: firstlayer/__init__ calls `register` from an
import hook on transformers, which must not find this module half-imported.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import MULTIMODAL_TYPES, SUPPORTED_TYPES, family_config
from firstlayer.folder import kept_layer0, mapped_table, record_weight_files, require_files
from firstlayer.hf.patch import TableEmbedding, parts_of, patch_as_recorded
from firstlayer.table.build import TokenLocal, table_chunks
from firstlayer.table.codec import empty_blocks, encode_rows
from firstlayer.table.layout import BLOCKS, SCALE_SUFFIX, TableLayout, segments, table_layout
from firstlayer.table.lookup import parse_table_memory

PRECOMPUTED_PREFIX = "firstlayer_"


def precomputed_model_type(model_type: str) -> str:
    """The `model_type` a converted folder of this family declares."""
    return PRECOMPUTED_PREFIX + model_type


def source_model_type(config: Any) -> str:
    """The family's own model type of a config, precomputed or not."""
    return family_config(config)["model_type"]


class PrecomputedConfig:
    """Mixed in before a family's config class; `firstlayer` holds the conversion's record."""

    source_model_type: str  # the family's own model type, set per class

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # The model class is made and registered on the first config of its family, so that
        # importing firstlayer imports no family's modeling code.
        model_class(self.source_model_type)


class PrecomputedForCausalLM:
    """Mixed in before a family's causal-LM class: layer 0 runs from the table."""

    config: Any

    def post_init(self) -> None:
        if not isinstance(self.get_input_embeddings(), TableEmbedding):
            install_empty_table(self)
        tie_lm_head_to_table(self)
        watch_source_weights(self)
        super().post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, refusing what it would only warn about: a folder of an
        older format, files missing or cut short, weights missing or of the wrong shape (which
        it would initialise at random). `table_memory` says where the table lives
        (`table.lookup.TABLE_MEMORY`; default `mapped`)."""
        # None with a `config` and a `state_dict`, as for any transformers model: no folder.
        given = pretrained_model_name_or_path
        folder = Path(given) if given is not None else None
        if folder is not None and folder.is_dir():
            refuse_mlx_quantized(folder)
            require_files(folder)
        memory = parse_table_memory(kwargs.pop("table_memory", "mapped"))
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        problems = {
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "of another shape": sorted(str(key) for key in info["mismatched_keys"]),
        }
        if any(problems.values()):
            found = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in problems.items() if v)
            raise FirstLayerError(
                f"{pretrained_model_name_or_path}: the weights do not match the precomputed model "
                f"its config describes ({found}): convert the source again"
            )
        if folder is not None and folder.is_dir():
            place_table(model, folder, memory)
        warn_of_quantized_inputs(model.config.firstlayer)
        return (model, info) if wants_info else model

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args: Any, **kwargs: Any):
        """Refused unless it changes nothing: a new id's row is layer 0's output for its new
        embedding row, and layer 0's q/k/v weights that would compute it are not in this model."""
        table = self.get_input_embeddings()
        size = new_num_tokens if new_num_tokens is not None else table.num_embeddings
        multiple = kwargs.get("pad_to_multiple_of", args[0] if args else None)
        if multiple:
            size = -(-size // multiple) * multiple
        if size != table.num_embeddings:
            raise FirstLayerError(
                f"resize_token_embeddings({new_num_tokens}) on a precomputed model: its table "
                f"holds layer 0's output for each of its {table.num_embeddings} tokens, and the "
                "layer-0 weights that would compute rows for new ones were dropped; resize the "
                "original model's embeddings (and train them), then convert it again"
            )
        return table

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' save_pretrained, then the sizes and checksums of the weight files into
        the config's record, which `load` and `firstlayer check` compare."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            record_weight_files(Path(save_directory), self.config)


def refuse_mlx_quantized(folder: Path) -> None:
    """A folder converted from one mlx-lm quantized keeps its weights in mlx's own packing,
    which transformers (and vLLM) do not run: refused by name before any weight is read."""
    config = (
        json.loads((folder / "config.json").read_text())
        if (folder / "config.json").is_file()
        else {}
    )
    method = (config.get("firstlayer") or {}).get("quantization", {}).get("method")
    if method == "mlx":
        raise FirstLayerError(
            f"{folder} was converted from a folder mlx-lm quantized and keeps mlx's own "
            "quantized weights, which transformers and vLLM do not run: run it in mlx-lm "
            "(`mlx_lm.load(OUT, trust_remote_code=True)`, `mlx_lm.generate --model OUT "
            "--trust-remote-code`), or convert the unquantized model for transformers"
        )


def warn_of_quantized_inputs(record: dict) -> None:
    """Say so where a quantized folder's table quantizes layer 0's inputs as vLLM's kernels do:
    transformers runs such a scheme otherwise (compressed-tensors simulates it in the model's
    dtype; FP8 on a CPU is dequantized and not simulated at all), so the original loaded here
    differs from what the table holds by up to that quantization's error."""
    quantization = record.get("quantization", {})
    how = quantization.get("inputs_quantized")
    if how and quantization.get("quantized_for", "vllm") != "transformers":
        warnings.warn(
            f"layer 0's table rows quantize its inputs {how}; transformers runs this scheme's "
            "activations otherwise (in the model's dtype, or not at all on a CPU), so this "
            "model's logits differ from the original's loaded by transformers by up to that "
            "quantization's error; in vLLM they are the original's (convert with "
            "--quantized-for transformers for a folder that equals it here)",
            stacklevel=3,
        )


def install_empty_table(model: nn.Module) -> None:
    """Patch a freshly built model with a zero table of the recorded layout, for the loader to
    fill (on the meta device under from_pretrained, so it costs nothing)."""
    record = model.config.firstlayer
    parts, parallel = parts_of(model)
    layout = TableLayout.from_dict(record["table"])  # as written, with its int8 scale width
    if layout != table_layout(model, parts, parallel):
        raise FirstLayerError(
            "the table layout in config.json does not match the model the config describes: "
            "the folder was edited; convert the source again"
        )
    weight = model.get_submodule(parts.embedding).weight  # (V, D)
    # In their stored dtypes: the loader then casts nothing, so it reads none of the table's
    # pages (`place_table` maps them after loading).
    blocks, scales = empty_blocks(
        record["table"], layout, weight.shape[0], weight.dtype, weight.device
    )
    patch_as_recorded(model, parts, layout, record, blocks, scales, weight.dtype)


def tie_lm_head_to_table(model: nn.Module) -> None:
    """Declare the tie the table keeps: a serial model's tied LM head reads the residual block,
    so transformers ties, saves and loads it as it does a tied embedding."""
    record = model.config.firstlayer
    reads_table = bool(record["lm_head"]["reads_table"])
    model.config.tie_word_embeddings = reads_table
    lm_head, table = record["lm_head"]["module"], record["table"]["module"]
    model._tied_weights_keys = {f"{lm_head}.weight": f"{table}.residual"} if reads_table else {}


@functools.cache
def config_class(model_type: str) -> type:
    """The config class of a precomputed model of family `model_type`, registered."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = CONFIG_MAPPING[model_type]
    attributes = {
        "model_type": precomputed_model_type(model_type),
        "source_model_type": model_type,
        "__module__": __name__,
        "__doc__": f"{base.__name__} of a model precomputed by firstlayer.",
    }
    cls = type(f"FirstLayer{base.__name__}", (PrecomputedConfig, base), attributes)
    AutoConfig.register(cls.model_type, cls, exist_ok=True)
    return cls


@functools.cache
def model_class(model_type: str) -> type:
    """The causal-LM class of a precomputed model of family `model_type` (a multimodal family's
    image-text-to-text class), registered with the Auto classes that build the original."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = config_class(model_type)
    autos = auto_classes(model_type)
    base = autos[0]._model_mapping[CONFIG_MAPPING[model_type]]
    attributes = {
        "config_class": config_cls,
        "__module__": __name__,
        "__doc__": f"{base.__name__} whose layer 0 runs from a firstlayer table.",
    }
    cls = type(f"FirstLayer{base.__name__}", (PrecomputedForCausalLM, base), attributes)
    for auto in autos:
        if CONFIG_MAPPING[model_type] in auto._model_mapping:
            auto.register(config_cls, cls, exist_ok=True)
    register_weight_conversions(model_type)
    return cls


def auto_model(model_type: str) -> type:
    """The Auto class that builds and loads a model of this type, precomputed or not."""
    return auto_classes(model_type.removeprefix(PRECOMPUTED_PREFIX))[0]


def auto_model_of(folder: str | Path) -> type:
    """`auto_model` for a model folder, by its config.json (causal LM where it has none)."""
    config = Path(folder) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type", "") if config.is_file() else ""
    return auto_model(model_type)


def auto_classes(model_type: str) -> tuple[type, ...]:
    """The Auto classes that build a family's original, the one that names it first: causal LM,
    or for a multimodal family image-text-to-text (Gemma 3 is both)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if model_type in MULTIMODAL_TYPES:
        return AutoModelForImageTextToText, AutoModelForCausalLM
    return (AutoModelForCausalLM,)


def register_weight_conversions(model_type: str) -> None:
    """The family's checkpoint conversions that combine tensors (Mixtral's experts, stored one
    tensor per expert and fused on loading) apply to its precomputed model type as well."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import WeightConverter

    mapping = get_checkpoint_conversion_mapping(model_type)
    # Only where transformers combines tensors (`as_saved` splits them again on
    # convert): a folder keeps renamed weights under the model's own names, as convert writes.
    if mapping and any(isinstance(t, WeightConverter) for t in mapping):
        register_checkpoint_conversion_mapping(
            precomputed_model_type(model_type), mapping, overwrite=True
        )


def register_with_transformers() -> None:
    """Register every supported family's precomputed config with AutoConfig (its model class
    follows on first use). Idempotent."""
    for model_type in (*SUPPORTED_TYPES, *MULTIMODAL_TYPES):
        config_class(model_type)


def adopt(model: nn.Module, record: dict) -> nn.Module:
    """Turn a model patched in place (`hf.patch.patch`) into its family's precomputed class, with
    `record` in a config of its own, so that save_pretrained writes a folder that loads as one.
    The caller's config object is left as it was: it may build other models (a classifier, the
    original again) that must not come out precomputed."""
    family = record["model_type"]
    own_config(model)
    model.config.firstlayer = record
    model.config.__class__ = config_class(family)
    model.__class__ = model_class(family)
    tie_lm_head_to_table(model)
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    watch_source_weights(model)
    return model


def own_config(model: nn.Module) -> None:
    """Give the model (and each of its modules that shared it) a copy of its config object."""
    shared = model.config
    config = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = config


def watch_source_weights(model: nn.Module) -> None:
    """`load_state_dict` of the table's sources under the original's names computes the table
    again, or refuses (`SourceWeights`). Idempotent."""
    if not getattr(model, "firstlayer_watches_sources", False):
        model.register_load_state_dict_pre_hook(SourceWeights())
        model.firstlayer_watches_sources = True


class SourceWeights:
    """load_state_dict pre-hook of a precomputed model: new values for what the table was
    computed from, under the original's names (its embedding, layer 0's token-local modules),
    compute the table again when all of them arrive together, and are refused by name when only
    some do: a precomputed model never keeps a stale table."""

    def __call__(self, model: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        original = copy.deepcopy(original_on_meta(model.config))  # materialized below
        parts, parallel = parts_of(original, model.config.firstlayer)
        needed = {f"{parts.embedding}.weight"} | {
            f"{module}.{name}"
            for module in parts.token_local(parallel)
            for name in original.get_submodule(module).state_dict()
        }
        arrived = {k.removeprefix(prefix) for k in state_dict if k.startswith(prefix)} & needed
        # Layer 0's kept q/k/v (`keep_layer0`) are the model's own weights as well: they load as
        # any weight does, and compute the table again only with the others.
        kept = {
            f"{m}.{name}"
            for m in kept_layer0(model.config.firstlayer)
            for name in ("weight", "bias")
        }
        if not arrived - kept:
            return
        missing = sorted(needed - arrived)
        if missing:
            raise FirstLayerError(
                f"new weights for {', '.join(sorted(arrived)[:3])} arrived without "
                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}: the table's rows "
                "are computed from all of them together, so a precomputed model takes them all "
                "at once or none (load the whole state dict, or convert the updated model)"
            )
        tensors = {
            name: state_dict[prefix + name] if name in kept else state_dict.pop(prefix + name)
            for name in needed
        }
        compute_table_again(model, original, parts, tensors)
        # The table's own tensors, as now computed, for the load (strict ones ask for them).
        table = model.get_input_embeddings()
        for name, tensor in table.state_dict().items():
            state_dict[f"{prefix}{parts.embedding}.{name}"] = tensor


@torch.no_grad()
def compute_table_again(
    model: nn.Module, original: nn.Module, parts: Any, tensors: dict[str, Tensor]
) -> None:
    """The table's rows from new source weights, written over the old ones in place (a tied LM
    head keeps reading the residual block it shares)."""
    for module in parts.token_local(model.config.firstlayer["architecture"] == "parallel"):
        layer = original.get_submodule(module)
        layer.to_empty(device="cpu")
        layer.load_state_dict({k: tensors[f"{module}.{k}"] for k in layer.state_dict()})
    table = model.get_input_embeddings()
    layout = TableLayout.from_dict(model.config.firstlayer["table"])
    embedding = tensors[f"{parts.embedding}.weight"]
    token_local = TokenLocal(original, parts, layout, embedding_weight=embedding)
    for block in BLOCKS:
        stored, scales = getattr(table, block), getattr(table, block + SCALE_SUFFIX)
        ranges = segments(layout, block)
        for start, rows in table_chunks(token_local, stored.shape[0], block):
            codes, row_scales = encode_rows(rows, stored.dtype, ranges)
            stored[start : start + len(rows)] = codes.to(stored.device)
            if scales is not None:
                scales[start : start + len(rows)] = row_scales.to(scales.device)
    if table.attn_norm is not None:
        norm = original.get_submodule(parts.attn_norm).state_dict()
        table.attn_norm.load_state_dict(norm)


def __getattr__(name: str) -> type:
    """The classes made on demand, by name: pickle and vLLM's worker processes find them here."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    for model_type in (*SUPPORTED_TYPES, *MULTIMODAL_TYPES):
        if name == f"FirstLayer{CONFIG_MAPPING_NAMES[model_type]}":
            return config_class(model_type)
        names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES | MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if name == f"FirstLayer{names[model_type]}":
            return model_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def place_table(model: nn.Module, folder: Path, memory: str = "mapped") -> None:
    """Put a loaded model's table where `memory` says (`table.lookup.TABLE_MEMORY`): `device`
    leaves it where transformers put every weight; `mapped` points the table's blocks at the
    folder's files (`folder.mapped_table`); `host` copies them into host memory, page-locked
    where there is CUDA. Mapped and host blocks stay in their stored dtype and on the host
    whatever the model's dtype or device; each call converts only the rows it reads."""
    if memory == "device":
        return
    table = model.get_input_embeddings()
    blocks, files = mapped_table(folder, model.config.firstlayer)
    if memory == "host":
        blocks = {name: to_host(tensor.clone()) for name, tensor in blocks.items()}
        files = ()
    table.dtype = model.get_output_embeddings().weight.dtype
    table.keep_on_host(blocks, files)


def to_host(tensor: Tensor) -> Tensor:
    """A tensor in host memory, page-locked where there is CUDA (copies overlap compute)."""
    tensor = tensor.cpu()
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def saved_config(
    model: nn.Module, record: dict, dtype: torch.dtype, quantization: dict | None = None
) -> Any:
    """The source model's config as its family's precomputed config class, with the record and
    the converted `quantization` config of a quantized checkpoint."""
    family = record["model_type"]
    config = copy.deepcopy(model.config)
    # A GGUF checkpoint arrives dequantized; the folder holds plain tensors.
    for attribute in ("quantization_config", "_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    if quantization is not None:
        config.quantization_config = quantization
    config.__class__ = config_class(family)
    config.architectures = [model_class(family).__name__]
    # Only a serial model's LM head stays tied, to the table's residual block.
    config.tie_word_embeddings = bool(record["lm_head"]["reads_table"])
    config.dtype = str(dtype).removeprefix("torch.")
    config.firstlayer = record
    return config


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


def legacy_rope_fields(config: dict) -> dict:
    """RoPE settings under the top-level names mlx-lm 0.32's classes read (`rope_theta`,
    `rope_scaling`, GPT-NeoX's `rotary_emb_base`, Gemma 3's `rope_local_base_freq`, ...), from
    the `rope_parameters` transformers 5 writes instead: without them mlx-lm would take its own
    defaults, where the original folder (as published) names them."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    by_layer_type = "full_attention" in rope or "sliding_attention" in rope
    main = rope.get("full_attention", {}) if by_layer_type else rope
    fields: dict[str, Any] = {}
    if "rope_theta" in main:
        fields["rope_theta"] = fields["rotary_emb_base"] = main["rope_theta"]
    if "partial_rotary_factor" in main:
        fields["partial_rotary_factor"] = fields["rotary_pct"] = main["partial_rotary_factor"]
    if main.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {**main, "type": main["rope_type"]}
    if by_layer_type and "rope_theta" in rope.get("sliding_attention", {}):
        fields["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    return fields


@functools.cache
def published_name(config_json: str, key: str) -> str:
    """A weight's name as the family's published checkpoints give it (transformers' own renamings
    reverted: GPT-NeoX's `lm_head` was `embed_out`), for a config given as JSON."""
    from transformers.core_model_loading import revert_weight_conversion

    model = original_on_meta(json.loads(config_json))
    reverted = list(revert_weight_conversion(model, {key: torch.empty(0, device="meta")}))
    return reverted[0] if len(reverted) == 1 else key


def original_on_meta(config: Any) -> nn.Module:
    """The original family's model of a precomputed config, on the meta device: the module tree
    (and names) the table replaced part of. Costs no memory."""
    return _original_on_meta(json.dumps(family_config(config), sort_keys=True, default=str))


@functools.cache
def _original_on_meta(config_json: str) -> nn.Module:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = json.loads(config_json)
    values.pop("firstlayer", None)
    config = CONFIG_MAPPING[values["model_type"]].from_dict(values)
    with torch.device("meta"):
        return auto_classes(values["model_type"])[0].from_config(config).eval()
