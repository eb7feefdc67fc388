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
largest logit difference over the prompts.
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


def greedy(folder: Path, new_tokens: int, trust: bool) -> list[list[int]]:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(folder), trust_remote_code=trust)
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


if __name__ == "__main__":
    main()
