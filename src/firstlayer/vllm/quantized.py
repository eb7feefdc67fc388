"""A quantized precomputed folder in vLLM: what it must hold, and layer 0 built unquantized.

`firstlayer convert` copies a quantized checkpoint's kept tensors as stored (an int8 or FP8
`weight` beside its `weight_scale`, packed `weight_packed`, GPTQ's `qweight`/`qzeros`/`scales`,
...) and marks layer 0's eliminated Linears unquantized in the method's own words, so that vLLM
builds them as plain modules for the table to replace. vLLM checks no weight of a quantized model
(`DefaultModelLoader` tracks loading for unquantized models only): what it never loaded keeps
whatever memory it was given. So the plugin counts, against the folder's own tensor names:

- each quantized Linear's stored tensors, where the transformers model (built without the
  method's quantizer) expects a plain `weight`: a Linear is stored quantized when the folder
  holds tensors under its name beyond `weight` and `bias`. vLLM marks a fused parameter loaded
  when any one of its parts arrived, so the parts of one fused projection (q, k and v; gate and
  up, the family's `packed_modules_mapping`) must each hold what any of them holds: they share
  one quantization scheme in vLLM;
- vLLM's parameters, less those no checkpoint carries: the KV-cache quantization scales
  (`{q,k,v}_scale`, `{q,k,v}_zero_point`) vLLM's attention creates for every compressed-tensors
  model and fills with defaults, as vLLM's own tracker exempts them.

Layer 0's eliminated Linears must reach vLLM marked unquantized (`refuse_quantized_layer_0`, by
the method vLLM chose for them), and the folder's quantization_config and firstlayer's record of
it must agree (`refuse_unrecorded_quantization`, with the engine checks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from firstlayer.errors import FirstLayerError

PLAIN_LINEAR = frozenset({"weight", "bias"})  # what a Linear of the transformers model holds


def declares_quantization(config: Any) -> bool:
    """Whether a precomputed config declares a quantized checkpoint."""
    return bool(getattr(config, "quantization_config", None))


def as_stored(
    expected: set[str],
    linears: Iterable[str],
    stored: set[str],
    fused: Mapping[str, list[str]],
) -> set[str]:
    """The tensor names a quantized folder holds, from those the transformers model expects
    (`expected`), its Linears' names (`linears`), the folder's names (`stored`) and the family's
    fused projections (`fused`: vLLM's name -> the parts' names)."""
    held: dict[str, set[str]] = {m: set() for m in linears if f"{m}.weight" in expected}
    for name in stored:
        module, _, suffix = name.rpartition(".")
        if module in held:
            held[module].add(suffix)
    quantized = {m: suffixes for m, suffixes in held.items() if suffixes - PLAIN_LINEAR}
    parts = {part: group for group in fused.values() for part in group}
    for module in list(quantized):
        parent, _, leaf = module.rpartition(".")
        siblings = [f"{parent}.{p}" for p in parts.get(leaf, ()) if f"{parent}.{p}" in held]
        shared = set().union(*(quantized.get(s, set()) for s in siblings)) - {"bias"}
        for sibling in siblings:  # a part holding nothing is expected under the parts' names
            quantized[sibling] = quantized.get(sibling, set()) | shared
    names = set(expected)
    for module, suffixes in quantized.items():
        names.discard(f"{module}.weight")
        names |= {f"{module}.{s}" for s in suffixes}
    return names


def filled_with_defaults(model: nn.Module) -> set[str]:
    """vLLM's parameters that no checkpoint need carry: those of KV-cache quantization methods
    (attention's scales and zero points, defaults unless the checkpoint has a kv_cache_scheme),
    the exemption vLLM's own tracker makes for quantized models."""
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    return {
        f"{name}.{parameter}" if name else parameter
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quant_method", None), BaseKVCacheMethod)
        for parameter, _ in module.named_parameters(recurse=False)
    }


def refuse_quantized_layer_0(modules: Mapping[str, nn.Module], record: dict) -> None:
    """Raise if vLLM built any of layer 0's eliminated Linears (`modules`, by vLLM's name)
    quantized: the folder's quantization_config does not mark them unquantized, so vLLM chose
    kernels, checked shapes and allocated scales for modules no tensor fills, and the lists of
    quantized modules that vLLM derives from a folder's tensors (AWQ, GPTQ) no longer describe
    the checkpoint. Folders converted from unquantized sources are not checked: quantizing them
    online (`quantization=...`) builds layer 0 quantized too, and the table replaces it."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    quantization = record.get("quantization")
    if not quantization:
        return
    for name, module in modules.items():
        for child, linear in module.named_modules():
            method = getattr(linear, "quant_method", None)
            if method is None or isinstance(method, UnquantizedLinearMethod):
                continue
            marked = quantization["dequantized_into_the_table"]
            raise FirstLayerError(
                f"vLLM builds layer 0's {'.'.join(filter(None, (name, child)))} quantized "
                f"({type(method).__name__}), though the table replaced it: the folder's "
                f"quantization_config does not mark {', '.join(marked)} unquantized "
                f"({UNQUANTIZED_MARKERS.get(quantization.get('method'), 'as its method does')}); "
                "convert the source again"
            )


# Where each method marks a Linear unquantized, as `firstlayer convert` writes it.
UNQUANTIZED_MARKERS = {
    "compressed-tensors": "in its `ignore` list",
    "fp8": "in its `modules_to_not_convert`",
    "awq": "in its `modules_to_not_convert`",
    "gptq": 'by a negative `dynamic` rule, "-:<regex>"',
}


def refuse_unrecorded_quantization(config: Any) -> None:
    """A folder's quantization_config and its firstlayer record must agree: a quantized source's
    conversion records its method and the Linears it dequantized into the table."""
    record = config.firstlayer.get("quantization")
    declared = getattr(config, "quantization_config", None)
    if declared and not record:
        raise FirstLayerError(
            f"config.json declares quantization ({declared.get('quant_method')!r}) that "
            "firstlayer's record does not: the folder was not converted from this quantized "
            "checkpoint; convert the source again"
        )
    if record and record.get("quantized_for", "vllm") != "vllm":
        raise FirstLayerError(
            f"the folder's table quantizes layer 0's inputs as {record['quantized_for']} runs "
            f"this {record['method']} scheme, which vLLM's kernels do otherwise: convert the "
            "source again with --quantized-for vllm (the default) to serve it in vLLM"
        )
    if record and not declared:
        raise FirstLayerError(
            f"the folder was converted from a {record['method']} checkpoint and its config.json "
            "has lost the quantization_config its kept weights need; convert the source again"
        )
