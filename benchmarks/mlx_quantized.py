"""A converted folder quantized by `mlx_lm.convert --quantize`, against the original quantized the
same way: how often their greedy tokens agree.

    .venv/bin/python benchmarks/mlx_quantized.py [SOURCE] [--bits 4 8] [--new-tokens 32]
        [--dtype float16]

SOURCE (default: SmolLM2-135M-Instruct, `default`) is loaded by firstlayer, saved as a Hugging
Face folder (the original) and converted; `mlx_lm.convert --quantize` then quantizes each, and
mlx-lm generates greedily from both for eight prompts. mlx-lm quantizes the original's q/k/v
projections and the table (`MlxTableEmbedding`'s two blocks, as it quantizes an embedding), so
the two quantized models differ by where layer 0's rounding happens. Reported per bit width:
tokens equal up to the first difference, as a share of all new tokens, and prompts whose whole
continuation is equal; the same for the unquantized pair, which must agree fully; and, for scale,
each quantized model against the unquantized original. Last, the quantized original itself
converted (`firstlayer convert` of the folder mlx-lm quantized: a q/k/v table in the model's
dtype, the embedding and every other kept tensor as stored) against it: greedy agreement and the
largest logit difference over the prompts; for a model with mlx-lm's Llama names, layer 0's q/k/v
over the vocabulary as mlx computes it and as the table holds it, each against the exact value
from the same stored weights; and, for scale, both folders' greedy tokens against the original
run with float32 activations (`model.set_dtype(mx.float32)`: the same weights, mlx's products
summed in float32).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1969, the first person to walk on the moon",
)


def greedy(folder: Path, new_tokens: int, trust: bool, dtype=None) -> list[list[int]]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(folder), trust_remote_code=trust)
    if dtype is not None:
        model.set_dtype(dtype)
    outputs = []
    for prompt in PROMPTS:
        ids = mx.array(tokenizer.encode(prompt))
        steps = generate_step(ids, model, max_tokens=new_tokens)
        outputs.append([int(token) for token, _ in steps])
    return outputs


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Share of new tokens equal up to each prompt's first difference; prompts fully equal."""
    prefix = 0
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x))
        prefix += same
    total = sum(len(x) for x in a)
    return prefix / total, sum(x == y for x, y in zip(a, b, strict=True))


def line(a: list[list[int]], b: list[list[int]]) -> str:
    share, equal = agreement(a, b)
    return f"{share:.1%} of new tokens before the first difference, {equal}/{len(a)} prompts equal"


def prompt_logits(folder: Path, trust: bool) -> list:
    """Each prompt's logits at every position, in float32."""
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(folder), trust_remote_code=trust)
    return [model(mx.array([tokenizer.encode(p)])).astype(mx.float32) for p in PROMPTS]


def logit_gap(a: list, b: list) -> str:
    import mlx.core as mx

    gap = max(float(mx.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    scale = max(float(mx.abs(x).max()) for x in a)
    return f"largest logit difference {gap:.4f} (largest logit {scale:.1f})"


def layer0_errors(quantized: Path, converted: Path) -> str:
    """Layer 0's q/k/v for every token id, as mlx-lm computes it from the quantized original and
    as the converted folder's table holds it, against the exact value (float64) from the same
    stored weights: largest and mean absolute error, and the share equal to the exact value
    rounded to the model's dtype."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    import torch

    original, _ = mlx_lm.load(str(quantized))
    precomputed, _ = mlx_lm.load(str(converted), trust_remote_code=True)
    layer = original.model.layers[0]
    attention = layer.self_attn
    if not all(hasattr(attention, f"{p}_proj") for p in "qkv"):
        return "not a model with mlx-lm's Llama names: layer 0 not compared"

    def f64(a) -> np.ndarray:
        return np.array(a.astype(mx.float32)).astype(np.float64)

    embedded = original.model.embed_tokens(mx.arange(original.args.vocab_size))
    normed = layer.input_layernorm(embedded)
    computed = np.concatenate([f64(getattr(attention, f"{p}_proj")(normed)) for p in "qkv"], 1)
    x = f64(embedded)
    norm = f64(layer.input_layernorm.weight)
    exact_norm = x / np.sqrt((x**2).mean(-1, keepdims=True) + layer.input_layernorm.eps) * norm
    linears = [getattr(attention, f"{p}_proj") for p in "qkv"]
    weights = [
        f64(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)) for q in linears
    ]
    exact = exact_norm @ np.concatenate(weights).T
    table = precomputed.model.embed_tokens.qkv.weight
    dtype = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}.get(table.dtype)
    nearest = exact if dtype is None else torch.from_numpy(exact).to(dtype).double().numpy()
    lines = []
    for name, rows in (("mlx-lm's layer 0", computed), ("the table", f64(table))):
        error = np.abs(rows - exact)
        lines.append(
            f"{name}: largest error {error.max():.4f}, mean {error.mean():.2e}, "
            f"{np.mean(rows == nearest):.1%} equal to the exact value rounded"
        )
    # Why mlx-lm's is further off: its CPU kernel sums a quantized product's terms one at a time
    # in the activations' dtype. A serial sum so rounded, for 64 ids' q projection, against
    # mx.quantized_matmul's entries.
    q = linears[0]
    torch_dtype = dtype or torch.float32
    inputs = torch.from_numpy(f64(normed[:64])).to(torch_dtype)
    terms = torch.from_numpy(weights[0]).to(torch_dtype)
    serial = torch.zeros(inputs.shape[0], terms.shape[0], dtype=torch_dtype)
    for k in range(inputs.shape[1]):
        serial = serial + inputs[:, k : k + 1] * terms[:, k]
    same = np.mean(serial.double().numpy() == f64(q(normed[:64])))
    lines.append(f"a serial sum in the model's dtype gives {same:.1%} of mlx-lm's q entries")
    return f"layer 0's q/k/v (largest |q/k/v| {np.abs(exact).max():.2f}): " + "; ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="default")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    # The dtype mlx_lm.convert casts to before quantizing (as published MLX models are 16-bit);
    # default: the saved folder's own (float32 for the GGUF default).
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()

    from mlx_lm.convert import convert as mlx_convert

    from firstlayer.conversion import convert, convert_source
    from firstlayer.hf.loading import load_source
    from firstlayer.mlx.bench import save_original

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loaded = load_source(args.source)
        save_original(loaded.model, root / "original", loaded.tokenizer)
        convert(loaded.model, root / "precomputed", tokenizer=loaded.tokenizer)
        del loaded
        print(
            f"{args.source}, {len(PROMPTS)} prompts x {args.new_tokens} greedy tokens, "
            f"quantized in {args.dtype or 'the saved dtype'}"
        )
        dense = greedy(root / "original", args.new_tokens, False)
        b = greedy(root / "precomputed", args.new_tokens, True)
        print(f"unquantized: {line(dense, b)}")
        for bits in args.bits:
            for name in ("original", "precomputed"):
                mlx_convert(
                    str(root / name),
                    str(root / f"{name}-q{bits}"),
                    quantize=True,
                    q_bits=bits,
                    dtype=args.dtype,
                    trust_remote_code=name == "precomputed",
                )
            a = greedy(root / f"original-q{bits}", args.new_tokens, False)
            b = greedy(root / f"precomputed-q{bits}", args.new_tokens, True)
            print(f"{bits}-bit, precomputed against original: {line(a, b)}")
            # What quantization alone moves, for scale: each against the unquantized original.
            print(f"{bits}-bit original against unquantized: {line(dense, a)}")
            print(f"{bits}-bit precomputed against unquantized: {line(dense, b)}")
            converted, _ = convert_source(str(root / f"original-q{bits}"), root / f"from-q{bits}")
            c = greedy(converted, args.new_tokens, True)
            gap = logit_gap(
                prompt_logits(root / f"original-q{bits}", False), prompt_logits(converted, True)
            )
            print(f"{bits}-bit original converted, against it: {line(a, c)}; {gap}")
            print(f"{bits}-bit {layer0_errors(root / f'original-q{bits}', converted)}")
            import mlx.core as mx

            wide = greedy(root / f"original-q{bits}", args.new_tokens, False, mx.float32)
            print(f"{bits}-bit original with float32 activations, against it: {line(wide, a)}")
            print(f"  against the original converted: {line(wide, c)}")


if __name__ == "__main__":
    main()
