"""A quantized checkpoint's weights in bytes, from its config's `quantization_config` alone: each
decoder Linear at its scheme's stored size (packed values, scales, zero points), everything else in
the model's dtype. A decode step reads each weight once, so stored bytes are the bytes read.

Which Linears a scheme covers is matched on Llama's Hugging Face module names
(`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `mlp.experts.E.up_proj`,
`mlp.shared_expert.down_proj`, `lm_head`): the analyser reads configs, not module trees, and most
families keep those names. An MoE layer's experts are taken to be stored alike; routers, norms,
biases and embeddings stay in the model's dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from firstlayer.analysis.dims import ModelDims
from firstlayer.analysis.sources import config_quantization, quantization_method
from firstlayer.errors import FirstLayerError

# The model's other weights as accelerators run them, when a config is not quantized.
MODEL_DTYPE_BYTES = 2
DEFAULT_MODEL_DTYPE = "bfloat16"
DTYPE_BYTES = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}
INT32_BYTES = 4
GPTQ_SCALE_BYTES = 2  # GPTQ and AWQ keep float16 scales whatever the model's dtype
FP8_SCALE_BYTES = 4  # fine-grained FP8: float32 `weight_scale_inv`; "ue8m0" scales are 1 byte
MXFP4_GROUP = 32  # MXFP4: one 1-byte (E8M0) scale per 32 values, two 4-bit values per byte
# quant_method "gguf" is a GGUF file read through transformers, which dequantizes it as it loads.
_DEQUANTIZED_METHODS = ("gguf",)
COMPRESSED_TENSORS_FORMATS = (
    "float-quantized",
    "int-quantized",
    "naive-quantized",
    "pack-quantized",
)
_STRATEGIES = ("tensor", "channel", "group", "block")
_GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_AWQ_VERSIONS = ("gemm", "exllama", "ipex")  # the ones that load AutoAWQ's GEMM tensors
_DECODER = r"model\.layers\.\d+\."

Packing = Literal["byte", "int32_along_k", "int32_along_n", "nibble"]


@dataclass(frozen=True)
class Format:
    """How one quantized Linear of N outputs and K inputs is stored."""

    label: str  # what `analyze` prints: "fp8 block 128x128", "int4 GPTQ g128"
    bits: int
    packing: Packing  # one value a byte; int32 words along K (GPTQ) or N (AWQ); two a byte
    strategy: str  # where scales go: tensor, channel, group, block
    scale_bytes: int
    group_size: int = -1  # -1: one group across K
    block: tuple[int, int] = (1, 1)  # (out, in), strategy "block" only
    zero_points: Literal["none", "packed", "byte"] = "none"  # packed: int32 words along N
    has_g_idx: bool = False  # GPTQ's group index, one int32 per input

    def stored_bytes(self, n: int, k: int) -> int:
        groups = 1 if self.group_size <= 0 else math.ceil(k / self.group_size)
        values = {
            "byte": n * k,
            "int32_along_k": n * math.ceil(k * self.bits / 32) * INT32_BYTES,
            "int32_along_n": k * math.ceil(n * self.bits / 32) * INT32_BYTES,
            "nibble": n * math.ceil(k * self.bits / 8),
        }[self.packing]
        scales = {
            "tensor": 1,
            "channel": n,
            "group": n * groups,
            "block": math.ceil(n / self.block[0]) * math.ceil(k / self.block[1]),
        }[self.strategy]
        zeros = {
            "none": 0,
            "packed": groups * math.ceil(n * self.bits / 32) * INT32_BYTES,
            "byte": scales,
        }[self.zero_points]
        g_idx = k * INT32_BYTES if self.has_g_idx else 0
        return values + scales * self.scale_bytes + zeros + g_idx


@dataclass(frozen=True)
class Rule:
    """Linears whose name `re.match`es one of `patterns` are stored as `format` (None: in the
    model's dtype). A scheme's rules are tried in order; the first that matches decides."""

    format: Format | None
    patterns: tuple[str, ...]

    def matches(self, name: str) -> bool:
        return any(re.match(p, name) for p in self.patterns)


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization scheme, as its config states it."""

    method: str
    model_dtype: str  # the dtype of what the scheme leaves unquantized
    rules: tuple[Rule, ...]

    @property
    def model_bytes(self) -> int:
        return DTYPE_BYTES[self.model_dtype]

    @property
    def label(self) -> str:
        formats = (r.format.label for r in self.rules if r.format is not None)
        return ", ".join(dict.fromkeys(formats))

    def format_of(self, name: str) -> Format | None:
        return next((r.format for r in self.rules if r.matches(name)), None)

    def linear_bytes(self, name: str, n: int, k: int) -> int:
        """Bytes stored (and read each decode step) for one Linear of N outputs and K inputs."""
        scheme = self.format_of(name)
        return n * k * self.model_bytes if scheme is None else scheme.stored_bytes(n, k)


def quantization_of(config: Mapping[str, Any], where: str = "the config") -> Quantization | None:
    """The config's scheme; None for an unquantized config and for GGUF (dequantized as it loads).
    A method the analyser does not count is refused by name, never read as dense."""
    quantization = config_quantization(config)
    if quantization is None:
        return None
    if not isinstance(quantization, Mapping):
        raise FirstLayerError(f"{where}: quantization_config is not an object: pass a config.json")
    method = quantization_method(quantization)
    if method in _DEQUANTIZED_METHODS:
        return None
    if method not in _READERS:
        known = ", ".join(_READERS)
        raise FirstLayerError(
            f"{where} is quantized with {method!r}, which `firstlayer analyze` does not count: it "
            f"counts {known} (and GGUF, as its dequantized model)"
        )
    dtype = str(config.get("torch_dtype") or config.get("dtype") or DEFAULT_MODEL_DTYPE)
    model_dtype = dtype if dtype in ("float32", "bfloat16", "float16") else DEFAULT_MODEL_DTYPE
    rules = _READERS[method](quantization, DTYPE_BYTES[model_dtype], where)
    return Quantization(method, model_dtype, tuple(rules))


# --- the Linears, as Llama names them ------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    n: int  # outputs
    k: int  # inputs


def attention_linears(m: ModelDims, layer: int) -> tuple[Linear, ...]:
    """Q, K, V (what the table replaces in layer 0), then O."""
    attn = f"model.layers.{layer}.self_attn"
    return (
        Linear(f"{attn}.q_proj", m.q_dim, m.d),
        Linear(f"{attn}.k_proj", m.e, m.d),
        Linear(f"{attn}.v_proj", m.e, m.d),
        Linear(f"{attn}.o_proj", m.d, m.q_dim),
    )


def ffn_linears(m: ModelDims, prefix: str, hidden: int, is_gated: bool) -> tuple[Linear, ...]:
    """A gated FFN (gate, up, down) or a 2-matrix one (up, down)."""
    gate = (Linear(f"{prefix}.gate_proj", hidden, m.d),) if is_gated else ()
    up, down = Linear(f"{prefix}.up_proj", hidden, m.d), Linear(f"{prefix}.down_proj", m.d, hidden)
    return (*gate, up, down)


def expert_linears(m: ModelDims, layer: int) -> tuple[Linear, ...]:
    """One expert's FFN (a dense FFN is the one expert every token uses)."""
    mlp = f"model.layers.{layer}.mlp"
    prefix = f"{mlp}.experts.0" if m.n_experts > 1 else mlp
    return ffn_linears(m, prefix, m.ffn_hidden, m.ffn_matrices == 3)


def shared_linears(m: ModelDims, layer: int) -> tuple[Linear, ...]:
    """The gated FFN every token of an MoE layer also takes (Qwen2-MoE's shared expert)."""
    hidden = m.extras.shared_expert_hidden
    if not hidden:
        return ()
    return ffn_linears(m, f"model.layers.{layer}.mlp.shared_expert", hidden, is_gated=True)


@dataclass(frozen=True)
class Deltas:
    """Stored bytes minus the same weights' bytes in the model's dtype (negative where a scheme
    quantizes), per part of the model that reads are built from."""

    dense: int  # every layer's attention and shared-expert Linears
    expert: int  # every layer's one expert (all of a layer's experts are stored alike)
    layer0_expert: int
    qkv0: int  # layer 0's Q, K and V: what the table replaces
    head: int  # the LM head, unless it is the (unquantized) input embedding


def deltas(m: ModelDims, quantization: Quantization | None) -> Deltas:
    if quantization is None:
        return Deltas(0, 0, 0, 0, 0)

    def delta(linears: Sequence[Linear]) -> int:
        b = quantization.model_bytes
        return sum(quantization.linear_bytes(x.name, x.n, x.k) - x.n * x.k * b for x in linears)

    layers = range(m.n_layers)
    head = () if m.is_tied else (Linear("lm_head", m.vocab_size, m.d),)
    return Deltas(
        dense=sum(delta([*attention_linears(m, i), *shared_linears(m, i)]) for i in layers),
        expert=sum(delta(expert_linears(m, i)) for i in layers),
        layer0_expert=delta(expert_linears(m, 0)),
        qkv0=delta(attention_linears(m, 0)[:3]),
        head=delta(head),
    )


# --- reading each method's config ----------------------------------------------------------


def _compressed_tensors(q: Mapping[str, Any], model_bytes: int, where: str) -> Iterator[Rule]:
    # compressed-tensors matches a target or an ignore entry on the module's class ("Linear":
    # every Linear), on its name, or on a regular expression ("re:..."), its own rules.
    yield Rule(None, tuple(_target_patterns(q.get("ignore") or ())))
    for name, group in (q.get("config_groups") or {}).items():
        weights = group.get("weights")
        if not weights:
            continue  # activations only: the weights stay in the model's dtype
        fmt = group.get("format") or q.get("format") or _default_format(weights)
        where_group = f"{where}, config group {name!r}"
        yield Rule(
            _ct_format(weights, fmt, model_bytes, where_group),
            tuple(_target_patterns(group.get("targets") or ())),
        )


def _target_patterns(targets: Sequence[str]) -> Iterator[str]:
    for target in targets:
        if target.startswith("re:"):
            yield target[3:]
        elif target == "Linear":
            yield ".*"
        elif "." in target or target == "lm_head":
            yield re.escape(target) + "$"
        # other class names (an attention or decoder-layer class) select no Linear by name


def _default_format(weights: Mapping[str, Any]) -> str:
    if weights.get("type") == "float":
        return "float-quantized"
    return "pack-quantized" if int(weights.get("num_bits", 8)) < 8 else "int-quantized"


def _ct_format(weights: Mapping[str, Any], fmt: str, model_bytes: int, where: str) -> Format:
    bits = int(weights.get("num_bits", 8))
    strategy = str(weights.get("strategy") or "tensor")
    if fmt not in COMPRESSED_TENSORS_FORMATS or bits > 8:
        raise FirstLayerError(
            f"{where}: compressed-tensors format {fmt!r} with {bits}-bit weights is not one "
            f"`firstlayer analyze` counts: it counts {', '.join(COMPRESSED_TENSORS_FORMATS)} "
            "of 8 bits or fewer"
        )
    if strategy not in _STRATEGIES:
        raise FirstLayerError(
            f"{where}: weight strategy {strategy!r} is not one `firstlayer analyze` counts: it "
            f"counts {', '.join(_STRATEGIES)}"
        )
    group = int(weights.get("group_size") or -1) if strategy == "group" else -1
    block = _block(weights.get("block_structure")) if strategy == "block" else (1, 1)
    scale_dtype = weights.get("scale_dtype")
    scale_bytes = DTYPE_BYTES.get(str(scale_dtype).removeprefix("torch."), model_bytes)
    kind = "fp" if weights.get("type") == "float" else "int"
    packed = fmt == "pack-quantized"
    asymmetric = not weights.get("symmetric", True)
    where_scales = {"group": f"g{group}", "block": f"block {block[0]}x{block[1]}"}
    label = f"{kind}{bits} {where_scales.get(strategy, strategy)}" + (" asym" if asymmetric else "")
    return Format(
        label=label,
        bits=bits,
        packing="int32_along_k" if packed else "byte",
        strategy=strategy,
        scale_bytes=scale_bytes,
        group_size=group,
        block=block,
        zero_points=("packed" if packed else "byte") if asymmetric else "none",
    )


def _block(structure: Any) -> tuple[int, int]:
    # A list [out, in], or the older string "128x128".
    if isinstance(structure, str):
        structure = structure.lower().split("x")
    out, inner = (int(s) for s in structure)
    return out, inner


def _fp8(q: Mapping[str, Any], model_bytes: int, where: str) -> Iterator[Rule]:
    # transformers skips a module whose name contains an entry of modules_to_not_convert.
    yield _not_converted(q)
    scale_bytes = 1 if q.get("scale_fmt") == "ue8m0" else FP8_SCALE_BYTES
    block = q.get("weight_block_size")
    scales = "" if scale_bytes == FP8_SCALE_BYTES else ", ue8m0 scales"
    if block:
        bo, bi = _block(block)
        fmt = Format(
            f"fp8 block {bo}x{bi}{scales}", 8, "byte", "block", scale_bytes, block=(bo, bi)
        )
    else:
        fmt = Format(f"fp8 tensor{scales}", 8, "byte", "tensor", scale_bytes)
    yield Rule(fmt, (_DECODER,))


def _not_converted(q: Mapping[str, Any]) -> Rule:
    skipped = q.get("modules_to_not_convert") or ()
    return Rule(None, tuple(".*" + re.escape(s) for s in skipped))


def _gptq(q: Mapping[str, Any], model_bytes: int, where: str) -> Iterator[Rule]:
    checkpoint = q.get("checkpoint_format") or "gptq"
    if checkpoint not in _GPTQ_CHECKPOINT_FORMATS:
        raise FirstLayerError(
            f"{where}: GPTQ checkpoint_format {checkpoint!r} is not one `firstlayer analyze` "
            f"counts: it counts {', '.join(_GPTQ_CHECKPOINT_FORMATS)}"
        )
    base = _gptq_format(q)
    # GPTQModel's `dynamic`: "-:regex" leaves matching modules unquantized, "+:regex" (or a bare
    # regex) overrides bits or group_size for them; both re.match the module's name.
    for key, overrides in (q.get("dynamic") or {}).items():
        if key.startswith("-:"):
            yield Rule(None, (key[2:],))
        else:
            yield Rule(_gptq_format({**q, **(overrides or {})}), (key.removeprefix("+:"),))
    chosen = q.get("modules_in_block_to_quantize")
    if chosen:
        names = [n for group in chosen for n in ([group] if isinstance(group, str) else group)]
        yield Rule(base, tuple(_DECODER + re.escape(n) + "$" for n in names))
    else:
        yield Rule(base, (_DECODER,))
    if q.get("lm_head"):
        yield Rule(base, ("lm_head$",))


def _gptq_format(q: Mapping[str, Any]) -> Format:
    bits, group = int(q.get("bits", 4)), int(q.get("group_size", 128))
    label = f"int{bits} GPTQ g{group}" if group > 0 else f"int{bits} GPTQ channel"
    label += (", act-order" if q.get("desc_act") else "") + ("" if q.get("sym", True) else ", asym")
    return Format(
        label=label,
        bits=bits,
        packing="int32_along_k",
        strategy="group",
        scale_bytes=GPTQ_SCALE_BYTES,
        group_size=group,
        zero_points="packed",  # qzeros are stored for symmetric schemes too
        has_g_idx=True,
    )


def _awq(q: Mapping[str, Any], model_bytes: int, where: str) -> Iterator[Rule]:
    # transformers' AwqConfig.to_dict() keeps the version as an enum.
    version = str(getattr(q.get("version"), "value", q.get("version") or "gemm")).lower()
    if version not in _AWQ_VERSIONS:
        raise FirstLayerError(
            f"{where}: AWQ version {version!r} is not one `firstlayer analyze` counts: it counts "
            f"{', '.join(_AWQ_VERSIONS)} (AutoAWQ's GEMM tensors)"
        )
    bits = int(q.get("bits") or q.get("w_bit") or 4)
    group = int(q.get("group_size") or q.get("q_group_size") or 128)
    has_zeros = q.get("zero_point", True)
    yield _not_converted(q)
    fmt = Format(
        label=f"int{bits} AWQ g{group}" + ("" if has_zeros else ", no zero points"),
        bits=bits,
        packing="int32_along_n",
        strategy="group",
        scale_bytes=GPTQ_SCALE_BYTES,
        group_size=group,
        zero_points="packed" if has_zeros else "none",
    )
    yield Rule(fmt, (_DECODER,))


def _mxfp4(q: Mapping[str, Any], model_bytes: int, where: str) -> Iterator[Rule]:
    # gpt-oss: only the experts are MXFP4; attention, routers, embeddings stay.
    yield _not_converted(q)
    fmt = Format("mxfp4 experts", 4, "nibble", "group", 1, group_size=MXFP4_GROUP)
    yield Rule(fmt, (_DECODER + r"mlp\.experts\.",))


_READERS = {
    "compressed-tensors": _compressed_tensors,
    "fp8": _fp8,
    "gptq": _gptq,
    "awq": _awq,
    "mxfp4": _mxfp4,
}
