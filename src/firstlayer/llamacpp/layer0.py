"""Layer 0's token-local part as llama.cpp's graph computes it (arXiv 2402.13388, sections 1 and
2), from a GGUF file's own tensors: the rows of `token_qkv`, and for a parallel block x + ffn(x).

Computed with numpy in float32, in llama.cpp's order of operations on the CPU: its norms sum in
double, its GELU reads a float16 table, and a matmul first rounds its input to the weights'
dot-product type (ggml's vec_dot_type): F16 or BF16, or 8-bit blocks (Q8_0, Q8_1, Q8_K) for
quantized weights, as ggml's quantize_row_* does on x86. The rows then equal the original's own
layer 0 to float32 rounding, for quantized files too (bit for bit on SmolLM2's Q4_1 file).

q, k and v come out in the order the file's weights give them, which is the order llama.cpp's
graph reads them in: its converter has already permuted Llama's q/k rows for its rotary layout
(and gathered NeoX's per-head q, k, v into three blocks), so no permutation is needed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    Keys,
    dequantize,
    quantize,
)
from gguf.gguf_reader import ReaderTensor

from firstlayer.errors import FirstLayerError

F32, F16, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16
# ggml's GELU (tanh form) and its constants, in float32.
GELU_COEF_A = np.float32(0.044715)
SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
GELU_EXACT_BEYOND = np.float32(10.0)  # ggml skips the table past |x| >= 10: 0 below, x above


@dataclass(frozen=True)
class Graph:
    """One llama.cpp graph the patch covers, as far as layer 0's token-local part differs."""

    norm: str  # "rms" (ggml_rms_norm) or "layer" (ggml_norm, then weight and bias)
    eps_key: str
    parallel_key: str | None  # the metadata flag of a parallel residual; None: always serial


# The graphs `llama.cpp/0001-token-qkv.patch` reads token_qkv in. llama.cpp files Llama, Mistral,
# SmolLM2 and others under its Llama graph.
GRAPHS = {
    MODEL_ARCH.LLAMA: Graph("rms", Keys.Attention.LAYERNORM_RMS_EPS, None),
    MODEL_ARCH.GPTNEOX: Graph(
        "layer", Keys.Attention.LAYERNORM_EPS, Keys.LLM.USE_PARALLEL_RESIDUAL
    ),
}
TABLE_TENSOR = "token_qkv.weight"


def tensor_name(kind: MODEL_TENSOR, suffix: str = "weight", bid: int = 0) -> str:
    return f"{TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


EMBEDDING = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
OUTPUT = tensor_name(MODEL_TENSOR.OUTPUT)


def field_value(reader: GGUFReader, key: str) -> object | None:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def architecture_named(name: object) -> MODEL_ARCH:
    """A general.architecture's llama.cpp architecture, refused unless the patch covers it."""
    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == name), None)
    if arch not in GRAPHS:
        known = ", ".join(MODEL_ARCH_NAMES[a] for a in GRAPHS)
        raise FirstLayerError(
            f"general.architecture {name!r}: the llama.cpp patch reads a precomputed layer 0 in "
            f"the graphs of {known} only"
        )
    return arch


def architecture_of(reader: GGUFReader) -> tuple[MODEL_ARCH, str]:
    name = field_value(reader, "general.architecture")
    return architecture_named(name), str(name)


# The type ggml rounds a matmul's input to for weights of each type (ggml-cpu's vec_dot_type).
Q = GGMLQuantizationType
INPUT_TYPES = {
    Q.F32: Q.F32,
    Q.F16: Q.F16,
    Q.BF16: Q.BF16,
    **{t: Q.Q8_0 for t in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL)},
    **{t: Q.Q8_1 for t in (Q.Q4_1, Q.Q5_1)},
    **{t: Q.Q8_K for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ2_XXS)},
    **{t: Q.Q8_K for t in (Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M)},
}
Q8_BLOCK, Q8_K_BLOCK = 32, 256


def blocks(x: np.ndarray, size: int) -> np.ndarray:
    """(N, in) -> (N, in / size, size)."""
    return x.reshape(x.shape[0], -1, size)


def q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's quantize_row_q8_0 (and q8_1's quants), on x86: (the rounded input, each block's
    float32 scale). The codes use 127/amax in float32, the stored scale is amax/127 in float16."""
    xb = blocks(x, Q8_BLOCK)  # (N, B, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
    codes = np.rint(xb * inverse)  # half to even, as _mm256_round_ps
    d = amax / np.float32(127)
    rounded = codes * d.astype(np.float16).astype(np.float32)
    return rounded.reshape(x.shape), (codes.sum(axis=-1) * d[..., 0])


def q8_k(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref: scale -127/x_max (x_max the first value of largest |x|),
    codes rounded half to even and capped at 127, the scale's inverse kept in float32."""
    xb = blocks(x, Q8_K_BLOCK)  # (N, B, 256)
    first = np.abs(xb).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(xb, first, axis=-1)
    with np.errstate(divide="ignore"):
        scale = np.where(peak != 0, np.float32(-127) / peak, np.float32(0))
        inverse = np.where(peak != 0, np.float32(1) / scale, np.float32(0))
    return (np.minimum(np.rint(scale * xb), 127) * inverse).reshape(x.shape)


def rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm: float32 squares summed in double, the scale in float32."""
    mean = ((x * x).astype(np.float64).sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    return x * (np.float32(1) / np.sqrt(mean + np.float32(eps)))


def layer_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """ggml_norm: the mean summed in double, rounded, then the centred variance in double."""
    n = x.shape[-1]
    mean = x.astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32) / np.float32(n)
    centred = x - mean
    variance = ((centred * centred).astype(np.float64).sum(axis=-1, keepdims=True) / n).astype(
        np.float32
    )
    return centred * (np.float32(1) / np.sqrt(variance + np.float32(eps)))


@cache
def gelu_table() -> np.ndarray:
    """ggml's GELU for every float16 input, rounded to float16: (65536,) float32."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):  # the table's inf and nan entries are never read
        g = (
            np.float32(0.5)
            * h
            * (np.float32(1) + np.tanh(SQRT_2_OVER_PI * h * (1 + GELU_COEF_A * h * h)))
        )
    return g.astype(np.float16).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    """ggml_gelu on the CPU: x rounded to float16 and looked up, exact past |x| >= 10."""
    looked_up = gelu_table()[x.astype(np.float16).view(np.uint16)]
    return np.where(x <= -GELU_EXACT_BEYOND, 0, np.where(x >= GELU_EXACT_BEYOND, x, looked_up))


class Layer0:
    """A GGUF model's layer 0, its token-local weights dequantized: table rows for token ids."""

    def __init__(self, reader: GGUFReader):
        self.arch, self.arch_name = architecture_of(reader)
        self.tensors = {t.name: t for t in reader.tensors}
        if TABLE_TENSOR in self.tensors:
            raise FirstLayerError("this GGUF file is precomputed already (it holds token_qkv)")
        graph = GRAPHS[self.arch]
        self.norm = rms_norm if graph.norm == "rms" else layer_norm
        self.eps = float(field_value(reader, graph.eps_key.format(arch=self.arch_name)))
        parallel = graph.parallel_key and field_value(
            reader, graph.parallel_key.format(arch=self.arch_name)
        )
        self.is_parallel = bool(parallel)
        self.embedding = self.tensors[EMBEDDING]
        self.vocab_size, self.hidden_size = (int(n) for n in self.embedding.shape[::-1])
        self.used: list[str] = []  # every tensor read here: what the precomputed file drops
        self.attn_norm = self.affine(MODEL_TENSOR.ATTN_NORM)
        if tensor_name(MODEL_TENSOR.ATTN_QKV) in self.tensors:
            self.projections = [self.linear(MODEL_TENSOR.ATTN_QKV)]
        else:
            kinds = (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V)
            self.projections = [self.linear(kind) for kind in kinds]
        if self.is_parallel:
            self.ffn_norm = self.affine(MODEL_TENSOR.FFN_NORM)
            self.ffn_up = self.linear(MODEL_TENSOR.FFN_UP)
            self.ffn_down = self.linear(MODEL_TENSOR.FFN_DOWN)
        self.qkv_width = sum(p.weight.shape[0] for p in self.projections)

    def read(self, name: str, required: bool = True) -> np.ndarray | None:
        tensor = self.tensors.get(name)
        if tensor is None:
            if required:
                raise FirstLayerError(f"the GGUF file has no {name}: it is incomplete")
            return None
        self.used.append(name)
        return dequantized(tensor)

    def affine(self, kind: MODEL_TENSOR) -> tuple[np.ndarray, np.ndarray | None]:
        return self.read(tensor_name(kind)), self.read(tensor_name(kind, "bias"), required=False)

    def linear(self, kind: MODEL_TENSOR) -> GGMLLinear:
        name = tensor_name(kind)
        if name not in self.tensors:
            raise FirstLayerError(f"the GGUF file has no {name}: it is incomplete")
        self.read(name)
        bias = self.read(tensor_name(kind, "bias"), required=False)
        return GGMLLinear(self.tensors[name], bias)

    def embedding_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of token_embd as llama.cpp's get_rows gives them: (N, D) float32."""
        rows = dequantized(self.embedding, slice(start, stop))
        return rows.reshape(stop - start, self.hidden_size)

    def qkv(self, x: np.ndarray) -> np.ndarray:
        """token_qkv's rows for embedding rows x (N, D): q | k | v, (N, qkv_width)."""
        weight, bias = self.attn_norm
        normed = apply_affine(self.norm(x, self.eps), weight, bias)
        return np.concatenate([p(normed) for p in self.projections], axis=-1)

    def residual(self, x: np.ndarray) -> np.ndarray:
        """token_embd's rows of a parallel block: x + ffn(ffn_norm(x)), (N, D)."""
        assert self.is_parallel
        weight, bias = self.ffn_norm
        normed = apply_affine(self.norm(x, self.eps), weight, bias)
        return self.ffn_down(gelu(self.ffn_up(normed))) + x


def dequantized(tensor: ReaderTensor, rows: slice | None = None) -> np.ndarray:
    """A tensor's data (or some of its rows) in float32, numpy's shape (outer dims first)."""
    data = tensor.data if rows is None else tensor.data[rows]
    return np.ascontiguousarray(dequantize(data, tensor.tensor_type), dtype=np.float32)


def apply_affine(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    x = x * weight  # ggml_mul, then ggml_add: two roundings, as build_norm does them
    return x if bias is None else x + bias


class GGMLLinear:
    """x @ W^T (+ b) as ggml_mul_mat (then ggml_add) computes it on the CPU: the input rounded to
    the weights' dot-product type first (F16, BF16, or 8-bit blocks for quantized weights)."""

    def __init__(self, tensor: ReaderTensor, bias: np.ndarray | None):
        self.type = tensor.tensor_type
        if self.type not in INPUT_TYPES:
            raise FirstLayerError(f"{tensor.name} is {self.type.name}: not a type layer 0 reads")
        self.input_type = INPUT_TYPES[self.type]
        self.bias = bias
        self.weight = dequantized(tensor)  # (out, in)
        self.block_mins = None
        if self.input_type == Q.Q8_1:
            # Q4_1, Q5_1: w = d*q + m per block, and ggml adds m times the input block's sum
            # (Q8_1's s, rounded to float16) apart from d*q times the codes
            raw = np.array(tensor.data).reshape(
                tensor.data.shape[0], -1, GGML_QUANT_SIZES[self.type][1]
            )
            self.block_mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            raw[..., 2:4] = 0
            self.weight = np.ascontiguousarray(
                dequantize(raw.reshape(tensor.data.shape), self.type)
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (N, in) -> (N, out)
        if self.input_type in (Q.F16, Q.BF16):
            y = (
                dequantize(quantize(x, self.input_type), self.input_type).reshape(x.shape)
                @ self.weight.T
            )
        elif self.input_type in (Q.Q8_0, Q.Q8_1):
            rounded, sums = q8_0(x)
            y = rounded @ self.weight.T
            if self.block_mins is not None:
                y = y + sums.astype(np.float16).astype(np.float32) @ self.block_mins.T
        elif self.input_type == Q.Q8_K:
            y = q8_k(x) @ self.weight.T
        else:
            y = x @ self.weight.T
        return y if self.bias is None else y + self.bias
