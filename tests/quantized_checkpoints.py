"""Tiny quantized Llama checkpoints, written by hand in each format's documented layout.

Pure torch + safetensors (+ json): deterministic (seeded), no quantization library needed.
Each format has a writer (quantize a float weight into the tensors the format stores) and a
reference dequantizer (the tensors back to a float32 weight, out x in), the formulas of NOTES.md.

    python tinyquant.py OUT_ROOT [--dtype bfloat16|float16|float32] [--formats a,b,...]

writes OUT_ROOT/<format>/ (config.json, model.safetensors, generation_config.json) for every
format in FORMATS, plus OUT_ROOT/dense/ (the unquantized model the others were quantized from).

The model: LlamaForCausalLM, hidden 128, intermediate 256, 4 heads (head_dim 32), 2 kv heads,
2 layers, vocab 256, untied LM head (left unquantized, as llm-compressor/GPTQ/AWQ do by default).
Every Linear of the decoder layers is quantized (q/k/v/o, gate/up/down): in 128, 256; out 64,
128, 256 - all multiples of 32, so group sizes 32 and 128 divide and vLLM's CPU WNA16 kernel
(in and out multiples of 32) accepts every layer.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 128, 256, 4, 2, 2, 256
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # name -> (out, in)
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama_config(dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,  # transformers 5 writes "dtype"; both are read
        "dtype": dtype,
    }


def dense_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 weights; std chosen so that activations stay O(1) and greedy tokens vary."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        for name, (out, inp) in LINEARS.items():
            sd[p + name + ".weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    sd["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) / math.sqrt(HIDDEN)
    return sd


def quantized_linears() -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in LINEARS]


# ---------------------------------------------------------------------------------------------
# int4 packing helpers
# ---------------------------------------------------------------------------------------------
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble j holds column AWQ_ORDER[j] of its 8
AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # column k lives in nibble AWQ_REVERSE[k]


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """uint4 values (R, C) -> int32 (R/8, C): 8 consecutive rows per word, row 8r+j at bits 4j."""
    R, C = q.shape
    v = q.to(torch.int64).reshape(R // 8, 8, C)
    word = (v << SHIFTS[None, :, None]).sum(1)
    return _to_i32(word)


def pack_cols(q: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """uint4 values (R, C) -> int32 (R, C/8): 8 consecutive columns per word, column 8c+j at
    bits 4j (or, with `order`, column 8c+order[j] at bits 4j)."""
    R, C = q.shape
    v = q.to(torch.int64).reshape(R, C // 8, 8)
    if order is not None:
        v = v[:, :, order]
    word = (v << SHIFTS[None, None, :]).sum(2)
    return _to_i32(word)


def _to_i32(word: torch.Tensor) -> torch.Tensor:
    word = word & 0xFFFFFFFF
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_rows(w: torch.Tensor) -> torch.Tensor:
    R8, C = w.shape
    v = (w.to(torch.int64)[:, None, :] >> SHIFTS[None, :, None]) & 0xF
    return v.reshape(R8 * 8, C)


def unpack_cols(w: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """inverse of pack_cols; `order` as given to pack_cols."""
    R, C8 = w.shape
    v = (w.to(torch.int64)[:, :, None] >> SHIFTS[None, None, :]) & 0xF  # (R, C8, nibble)
    if order is not None:
        inv = [order.index(k) for k in range(8)]  # column k is nibble inv[k]
        v = v[:, :, inv]
    return v.reshape(R, C8 * 8)


# ---------------------------------------------------------------------------------------------
# formats: quantize(weight fp32 (out,in)) -> tensors; dequantize(tensors) -> fp32 (out,in)
# ---------------------------------------------------------------------------------------------
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def ct_int8_quant(w, sdtype, static_input):
    s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)  # (out, 1) channel strategy
    q = torch.round(w / s).clamp(-128, 127).to(torch.int8)
    t = {"weight": q, "weight_scale": s.to(sdtype)}
    if static_input:
        t["input_scale"] = torch.tensor([0.02], dtype=sdtype)  # (1,) tensor strategy
    return t


def ct_int8_deq(t):
    return t["weight"].float() * t["weight_scale"].float()


def ct_fp8_quant(w, sdtype, per_tensor):
    s = (w.abs().amax() if per_tensor else w.abs().amax(1, keepdim=True)) / FP8_MAX
    q = (w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    t = {"weight": q, "weight_scale": (s.reshape(1) if per_tensor else s).float().to(sdtype)}
    if per_tensor:
        t["input_scale"] = torch.tensor([0.01], dtype=sdtype)
    return t


def ct_fp8_deq(t):
    return t["weight"].float() * t["weight_scale"].float()


def ct_w4_quant(w, sdtype, group, symmetric):
    """compressed-tensors pack-quantized int4 (W4A16): signed int4 codes q in [-8, 7],
    W = (q - zp) * scale per (row, group); stored as q + 8 packed 8 per int32 along `in`."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    if symmetric:
        s = (g.abs().amax(-1) / 7.5).clamp(min=1e-8)  # compressed-tensors: max/((qmax-qmin)/2)
        s = s.to(sdtype).float()  # quantize with the stored (rounded) scale
        zp = torch.zeros_like(s, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8).to(sdtype).float()
        zp = (-8 - torch.round(lo / s)).clamp(-8, 7).to(torch.int64)
    q = (torch.round(g / s[..., None]) + zp[..., None]).clamp(-8, 7).to(torch.int64)
    t = {
        "weight_packed": pack_cols((q + 8).reshape(out, inp)),
        "weight_scale": s.to(sdtype),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if not symmetric:
        t["weight_zero_point"] = pack_rows(zp + 8)  # (out/8, groups), packed along dim 0
    return t


def ct_w4_deq(t, group):
    out, inp = (int(x) for x in t["weight_shape"])
    q = unpack_cols(t["weight_packed"])[:, :inp] - 8  # signed
    s = t["weight_scale"].float()
    zp = unpack_rows(t["weight_zero_point"])[:out] - 8 if "weight_zero_point" in t else 0
    g = q.reshape(out, inp // group, group) - (zp[..., None] if torch.is_tensor(zp) else 0)
    return (g * s[..., None]).reshape(out, inp).float()


def fp8_block_quant(w, block=(128, 128)):
    """quant_method "fp8" (fine-grained): weight e4m3 (out,in), weight_scale_inv float32
    (ceil(out/bo), ceil(in/bi)); W = weight * weight_scale_inv per block (a multiplier,
    despite the name)."""
    out, inp = w.shape
    bo, bi = block
    so, si = -(-out // bo), -(-inp // bi)
    pad = torch.zeros(so * bo, si * bi)
    pad[:out, :inp] = w
    blocks = pad.reshape(so, bo, si, bi)
    s = (blocks.abs().amax((1, 3)) / FP8_MAX).clamp(min=1e-12)  # (so, si)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(so * bo, si * bi)
    return {"weight": q[:out, :inp].to(FP8).contiguous(), "weight_scale_inv": s.float()}


def fp8_block_deq(t, block=(128, 128)):
    w, s = t["weight"].float(), t["weight_scale_inv"].float()
    out, inp = w.shape
    full = s.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return w * full


def gptq_quant(w, group, sym=True):
    """GPTQ v1 (AutoGPTQ / gptqmodel checkpoint_format "gptq"), 4 bit, desc_act False.
    Unsigned codes q in [0, 15]; W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1)),
    g = g_idx[i] = i // group. qzeros hold zero - 1 (v1 off-by-one): a symmetric zero of 8 is
    stored as 7 (0x77777777 per word)."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    if sym:
        s = (g.abs().amax(-1) / 7).clamp(min=1e-8)  # (out, groups); range [-8, 7] * s
        z = torch.full_like(s, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        z = torch.round(-lo / s).clamp(0, 15).to(torch.int64)
    s = s.half().float()
    q = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.int64)
    q = q.reshape(out, inp).t().contiguous()  # (in, out)
    return {
        "qweight": pack_rows(q),  # (in/8, out)
        "qzeros": pack_cols((z - 1).t().contiguous() & 0xF),  # (groups, out/8), zero - 1
        "scales": s.t().contiguous().half(),  # (groups, out) float16
        "g_idx": torch.arange(inp, dtype=torch.int32) // group,  # (in,)
    }


def gptq_deq(t, v2=False):
    q = unpack_rows(t["qweight"])  # (in, out)
    z = unpack_cols(t["qzeros"]) + (0 if v2 else 1)  # (groups, out); v1 stores zero - 1
    s = t["scales"].float()
    gi = t["g_idx"].long()
    return (s[gi] * (q - z[gi])).t().contiguous()


def awq_quant(w, group):
    """AWQ GEMM (AutoAWQ version "gemm", zero_point True), 4 bit. qweight int32 (in, out/8),
    qzeros int32 (groups, out/8), both packed along `out` in AWQ's order (nibble j holds column
    [0,2,4,6,1,3,5,7][j] of the 8); scales float16 (groups, out).
    W[o, i] = scales[i // group, o] * (q[i, o] - z[i // group, o]); no off-by-one."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    z = torch.round(-lo / s).clamp(0, 15).to(torch.int64)
    q = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, 15).to(torch.int64)
    q = q.reshape(out, inp).t().contiguous()  # (in, out)
    return {
        "qweight": pack_cols(q, AWQ_ORDER),
        "qzeros": pack_cols(z.t().contiguous(), AWQ_ORDER),
        "scales": s.t().contiguous().half(),
    }


def awq_deq(t, group):
    q = unpack_cols(t["qweight"], AWQ_ORDER)  # (in, out)
    z = unpack_cols(t["qzeros"], AWQ_ORDER)  # (groups, out)
    s = t["scales"].float()
    z = z.repeat_interleave(group, 0)
    s = s.repeat_interleave(group, 0)
    return (s * (q - z)).t().contiguous()


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def ct_config(weights: dict, input_activations: dict | None, fmt: str, ignore=("lm_head",)):
    base_args = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "num_bits": 8,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "tensor",
        "symmetric": True,
        "type": "int",
    }
    wa = {**base_args, **weights}
    ia = None if input_activations is None else {**base_args, **input_activations}
    if ia is not None and ia["dynamic"]:
        ia["observer"] = None
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": wa,
                "input_activations": ia,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    }


FORMATS = {
    # name: (quantization_config, per-linear quantize fn(w, dtype), dequantize fn(tensors))
    "ct-w8a8-int8-dynamic": (
        lambda: ct_config(
            {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
            "int-quantized",
        ),
        lambda w, d: ct_int8_quant(w, d, False),
        ct_int8_deq,
    ),
    "ct-w8a8-int8-static": (
        lambda: ct_config(
            {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            {"num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": True},
            "int-quantized",
        ),
        lambda w, d: ct_int8_quant(w, d, True),
        ct_int8_deq,
    ),
    "ct-fp8-dynamic": (  # llm-compressor's FP8_DYNAMIC: channel weights, dynamic per-token input
        lambda: ct_config(
            {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "symmetric": True,
                "dynamic": True,
            },
            "float-quantized",
        ),
        lambda w, d: ct_fp8_quant(w, d, False),
        ct_fp8_deq,
    ),
    "ct-fp8-static": (  # llm-compressor's FP8: per-tensor weights and static per-tensor input
        lambda: ct_config(
            {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
            {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
            "float-quantized",
        ),
        lambda w, d: ct_fp8_quant(w, d, True),
        ct_fp8_deq,
    ),
    "ct-w4a16-g32": (
        lambda: ct_config(
            {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 32,
                "symmetric": True,
            },
            None,
            "pack-quantized",
        ),
        lambda w, d: ct_w4_quant(w, d, 32, True),
        lambda t: ct_w4_deq(t, 32),
    ),
    "ct-w4a16-g128": (
        lambda: ct_config(
            {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 128,
                "symmetric": True,
            },
            None,
            "pack-quantized",
        ),
        lambda w, d: ct_w4_quant(w, d, 128, True),
        lambda t: ct_w4_deq(t, 128),
    ),
    "ct-w4a16-asym-g32": (
        lambda: ct_config(
            {
                "num_bits": 4,
                "type": "int",
                "strategy": "group",
                "group_size": 32,
                "symmetric": False,
            },
            None,
            "pack-quantized",
        ),
        lambda w, d: ct_w4_quant(w, d, 32, False),
        lambda t: ct_w4_deq(t, 32),
    ),
    "fp8-block": (
        lambda: {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
        lambda w, d: fp8_block_quant(w),
        fp8_block_deq,
    ),
    "gptq-g32": (
        lambda: {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 32,
            "desc_act": False,
            "sym": True,
            "lm_head": False,
            "damp_percent": 0.01,
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "meta": {"quantizer": ["tinyquant"]},
        },
        lambda w, d: gptq_quant(w, 32, True),
        gptq_deq,
    ),
    "awq-g32": (
        lambda: {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 32,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        },
        lambda w, d: awq_quant(w, 32),
        lambda t: awq_deq(t, 32),
    ),
}
# dtype of the config (and of the unquantized tensors) per format family: GPTQ/AWQ checkpoints
# are float16 by convention (their scales are float16 whatever the model)
PREFERRED_DTYPE = {"gptq-g32": "float16", "awq-g32": "float16"}


def write_folder(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )


def build(fmt: str, dtype: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """(config, tensors, dequantized fp32 weights per linear) of one format."""
    dt = DTYPES[dtype]
    dense = dense_weights(seed)
    if fmt == "dense":
        return llama_config(dtype), {k: v.to(dt) for k, v in dense.items()}, {}
    qconfig, quant, deq = FORMATS[fmt]
    targets = set(quantized_linears())
    tensors, deqs = {}, {}
    for name, w in dense.items():
        module = name.removesuffix(".weight")
        if module in targets:
            t = quant(w, dt)
            for k, v in t.items():
                tensors[f"{module}.{k}"] = v
            deqs[module] = deq(t)
        else:
            tensors[name] = w.to(dt)
    config = llama_config(dtype)
    config["quantization_config"] = qconfig()
    return config, tensors, deqs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--formats", default=",".join(["dense", *FORMATS]))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for fmt in a.formats.split(","):
        dtype = (
            a.dtype if fmt not in PREFERRED_DTYPE or a.dtype == "float32" else PREFERRED_DTYPE[fmt]
        )
        config, tensors, deqs = build(fmt, dtype, a.seed)
        write_folder(Path(a.out) / fmt, config, tensors)
        # the round trip: dequantized weight close to the dense one
        dense = dense_weights(a.seed)
        err = (
            max(
                (
                    (deqs[m] - dense[m + ".weight"]).abs().max() / dense[m + ".weight"].abs().max()
                ).item()
                for m in deqs
            )
            if deqs
            else 0.0
        )
        print(f"{fmt:24s} {dtype:9s} tensors={len(tensors):3d} max rel err={err:.4f}")


if __name__ == "__main__":
    main()
