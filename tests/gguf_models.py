"""Tiny random GGUF models for llama.cpp, written with gguf-py: a byte-level vocabulary under
seeded float32 weights of a Llama or a GPT-NeoX graph; and a file's dequantised copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, GGUFWriter

from firstlayer.llamacpp.export import copy_metadata
from firstlayer.llamacpp.layer0 import dequantized

D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128


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


def add_tokenizer(writer: GGUFWriter) -> None:
    # llama.cpp wants at least one merge: "a b", whose result is the token after eos
    tokens = byte_tokens() + ["<bos>", "<eos>", "ab"]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [CONTROL] * 2 + [1] + [CONTROL] * (VOCAB - 259))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)


def write_tiny(path: Path, arch: MODEL_ARCH, seed: int = 0) -> Path:
    """A 2-layer model of VOCAB tokens; norms and biases perturbed so none is a no-op.
    Llama: GQA, tied head (no output.weight), q/k/v biases. GPT-NeoX: parallel residual, partial
    rotary, LayerNorms with biases."""
    rng = np.random.default_rng(seed)
    name = MODEL_ARCH_NAMES[arch]
    vocab = VOCAB

    def randn(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm() -> np.ndarray:
        return 1 + randn(D)

    writer = GGUFWriter(path, name)
    add_tokenizer(writer)
    writer.add_uint32(f"{name}.context_length", 256)
    writer.add_uint32(f"{name}.embedding_length", D)
    writer.add_uint32(f"{name}.block_count", LAYERS)
    writer.add_uint32(f"{name}.feed_forward_length", FFN)
    writer.add_uint32(f"{name}.attention.head_count", HEADS)
    writer.add_float32(f"{name}.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", randn(vocab, D, scale=1.0))
    if arch == MODEL_ARCH.LLAMA:
        writer.add_uint32(f"{name}.attention.head_count_kv", KV_HEADS)
        writer.add_float32(f"{name}.attention.layer_norm_rms_epsilon", 1e-5)
        writer.add_uint32(f"{name}.rope.dimension_count", HEAD_DIM)
        writer.add_tensor("output_norm.weight", norm())
        for i in range(LAYERS):
            blk = f"blk.{i}"
            writer.add_tensor(f"{blk}.attn_norm.weight", norm())
            for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                writer.add_tensor(f"{blk}.attn_{proj}.weight", randn(heads * HEAD_DIM, D))
                writer.add_tensor(f"{blk}.attn_{proj}.bias", randn(heads * HEAD_DIM))
            writer.add_tensor(f"{blk}.attn_output.weight", randn(D, HEADS * HEAD_DIM))
            writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
            writer.add_tensor(f"{blk}.ffn_gate.weight", randn(FFN, D))
            writer.add_tensor(f"{blk}.ffn_up.weight", randn(FFN, D))
            writer.add_tensor(f"{blk}.ffn_down.weight", randn(D, FFN))
    else:
        writer.add_float32(f"{name}.attention.layer_norm_epsilon", 1e-5)
        writer.add_uint32(f"{name}.rope.dimension_count", HEAD_DIM // 4)
        writer.add_bool(f"{name}.use_parallel_residual", True)
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output_norm.bias", randn(D))
        writer.add_tensor("output.weight", randn(vocab, D))
        for i in range(LAYERS):
            blk = f"blk.{i}"
            for kind in ("attn_norm", "ffn_norm"):
                writer.add_tensor(f"{blk}.{kind}.weight", norm())
                writer.add_tensor(f"{blk}.{kind}.bias", randn(D))
            writer.add_tensor(f"{blk}.attn_qkv.weight", randn(3 * D, D))
            writer.add_tensor(f"{blk}.attn_qkv.bias", randn(3 * D))
            writer.add_tensor(f"{blk}.attn_output.weight", randn(D, D))
            writer.add_tensor(f"{blk}.attn_output.bias", randn(D))
            writer.add_tensor(f"{blk}.ffn_up.weight", randn(FFN, D))
            writer.add_tensor(f"{blk}.ffn_up.bias", randn(FFN))
            writer.add_tensor(f"{blk}.ffn_down.weight", randn(D, FFN))
            writer.add_tensor(f"{blk}.ffn_down.bias", randn(D))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
