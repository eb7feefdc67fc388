"""Tiny random GGUF models for llama.cpp, written with gguf-py: a byte-level vocabulary under
seeded float32 weights of a Llama or a GPT-NeoX graph; and a file's dequantised copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    quantize,
)

from firstlayer.llamacpp.export import copy_metadata
from firstlayer.llamacpp.layer0 import dequantized

# A byte-level BPE vocabulary of one merge: GPT-2's 256 byte tokens, then bos, eos, "ab" and
# unused control tokens (gguf-py reads SmolLM2's 49k tokens for seconds; these, at once).
VOCAB = 384
BOS, EOS = 256, 257
CONTROL = 3  # llama.cpp's token type of special tokens


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-in for each byte (its `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclass(frozen=True)
class Shape:
    """A model's dimensions; the defaults are the tests' tiny model."""

    d: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # GPT-NeoX: every head its own
    ffn: int = 128
    vocab: int = VOCAB
    context: int = 256

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


def written(writer: GGUFWriter, path: Path) -> Path:
    """Write out what `writer` was given, all in memory, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer: GGUFWriter, vocab: int) -> None:
    # llama.cpp wants at least one merge: "a b", whose result is the token after eos
    tokens = byte_tokens() + ["<bos>", "<eos>", "ab"]
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [CONTROL] * 2 + [1] + [CONTROL] * (vocab - 259))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)


def write_tiny(
    path: Path,
    arch: MODEL_ARCH,
    shape: Shape = Shape(),
    seed: int = 0,
    dtype: type = np.float32,
    tied: bool = False,
) -> Path:
    """A random model of `shape`; norms and biases perturbed so none is a no-op; matrices in
    `dtype` (float32 or float16), norms and biases in float32. Llama: GQA, tied head (no
    output.weight), q/k/v biases. GPT-NeoX: parallel residual, rotary on a quarter of each head,
    LayerNorms with biases."""
    rng = np.random.default_rng(seed)
    name = MODEL_ARCH_NAMES[arch]
    d, ffn, vocab, head_dim = shape.d, shape.ffn, shape.vocab, shape.head_dim

    def randn(*dims: int, scale: float = 0.1) -> np.ndarray:
        values = (scale * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)
        return values.astype(dtype) if len(dims) > 1 else values

    def norm() -> np.ndarray:
        return 1 + randn(d)

    writer = GGUFWriter(path, name)
    add_tokenizer(writer, vocab)
    writer.add_uint32(f"{name}.context_length", shape.context)
    writer.add_uint32(f"{name}.embedding_length", d)
    writer.add_uint32(f"{name}.block_count", shape.layers)
    writer.add_uint32(f"{name}.feed_forward_length", ffn)
    writer.add_uint32(f"{name}.attention.head_count", shape.heads)
    writer.add_float32(f"{name}.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", randn(vocab, d, scale=1.0))
    if arch == MODEL_ARCH.LLAMA:
        writer.add_uint32(f"{name}.attention.head_count_kv", shape.kv_heads)
        writer.add_float32(f"{name}.attention.layer_norm_rms_epsilon", 1e-5)
        writer.add_uint32(f"{name}.rope.dimension_count", head_dim)
        writer.add_tensor("output_norm.weight", norm())
        for i in range(shape.layers):
            blk = f"blk.{i}"
            writer.add_tensor(f"{blk}.attn_norm.weight", norm())
            for proj, heads in (("q", shape.heads), ("k", shape.kv_heads), ("v", shape.kv_heads)):
                writer.add_tensor(f"{blk}.attn_{proj}.weight", randn(heads * head_dim, d))
                writer.add_tensor(f"{blk}.attn_{proj}.bias", randn(heads * head_dim))
            writer.add_tensor(f"{blk}.attn_output.weight", randn(d, shape.heads * head_dim))
            writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
            writer.add_tensor(f"{blk}.ffn_gate.weight", randn(ffn, d))
            writer.add_tensor(f"{blk}.ffn_up.weight", randn(ffn, d))
            writer.add_tensor(f"{blk}.ffn_down.weight", randn(d, ffn))
    else:
        writer.add_float32(f"{name}.attention.layer_norm_epsilon", 1e-5)
        writer.add_uint32(f"{name}.rope.dimension_count", head_dim // 4)
        writer.add_bool(f"{name}.use_parallel_residual", True)
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output_norm.bias", randn(d))
        if not tied:  # llama.cpp's GPT-NeoX graph wants its own head; the export reads either
            writer.add_tensor("output.weight", randn(vocab, d))
        for i in range(shape.layers):
            blk = f"blk.{i}"
            for kind in ("attn_norm", "ffn_norm"):
                writer.add_tensor(f"{blk}.{kind}.weight", norm())
                writer.add_tensor(f"{blk}.{kind}.bias", randn(d))
            writer.add_tensor(f"{blk}.attn_qkv.weight", randn(3 * d, d))
            writer.add_tensor(f"{blk}.attn_qkv.bias", randn(3 * d))
            writer.add_tensor(f"{blk}.attn_output.weight", randn(d, d))
            writer.add_tensor(f"{blk}.attn_output.bias", randn(d))
            writer.add_tensor(f"{blk}.ffn_up.weight", randn(ffn, d))
            writer.add_tensor(f"{blk}.ffn_up.bias", randn(ffn))
            writer.add_tensor(f"{blk}.ffn_down.weight", randn(d, ffn))
            writer.add_tensor(f"{blk}.ffn_down.bias", randn(d))
    return written(writer, path)


def write_dequantized(reader: GGUFReader, out: Path, kind: GGMLQuantizationType) -> Path:
    """A file with every quantized tensor stored in `kind` (F32 or F16): the original an F32 or
    F16 table is compared with."""
    writer = GGUFWriter(out, str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, writer)
    dtype = np.float32 if kind == GGMLQuantizationType.F32 else np.float16
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = dequantized(tensor)
        if data.dtype != dtype and data.ndim > 1:  # norms and biases stay F32, as converters do
            data = data.astype(dtype)
        elif data.ndim == 1:
            data = data.astype(np.float32)
        writer.add_tensor(tensor.name, data)
    return written(writer, out)


def write_requantized(
    source: Path, out: Path, kind: GGMLQuantizationType, donor: Path | None = None
) -> Path:
    """SOURCE (float32) with layer 0's q, k and v weights quantized to `kind` by gguf-py, or
    taken from `donor`, the same model quantized by llama.cpp (gguf-py writes no K-quants)."""
    reader = GGUFReader(source)
    writer = GGUFWriter(out, str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, writer)
    projections = {f"blk.0.attn_{p}.weight" for p in "qkv"}
    donated = {t.name: t for t in GGUFReader(donor).tensors} if donor else {}
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name in projections and donor:
            given = donated[tensor.name]
            assert given.tensor_type == kind, (given.name, given.tensor_type)
            writer.add_tensor(tensor.name, np.array(given.data), raw_dtype=kind)
        elif tensor.name in projections:
            writer.add_tensor(tensor.name, quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, data)
    return written(writer, out)
