"""A converted folder quantized by `mlx_lm.convert --quantize`, against the original quantized the
same way: how often their greedy tokens agree.

    .venv/bin/python benchmarks/mlx_quantized.py [SOURCE] [--bits 4 8] [--new-tokens 32]

SOURCE (default: SmolLM2-135M-Instruct, `default`) is loaded by firstlayer, saved as a Hugging
Face folder (the original) and converted; `mlx_lm.convert --quantize` then quantizes each, and
mlx-lm generates greedily from both for eight prompts. mlx-lm quantizes the original's q/k/v
projections and the table (`MlxTableEmbedding`'s two blocks, as it quantizes an embedding), so
the two quantized models differ by where layer 0's rounding happens. Reported per bit width:
tokens equal up to the first difference, as a share of all new tokens, and prompts whose whole
continuation is equal; the same for the unquantized pair, which must agree fully; and, for scale,
each quantized model against the unquantized original.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="default")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    from mlx_lm.convert import convert as mlx_convert

    from firstlayer.conversion import convert
    from firstlayer.hf.loading import load_source
    from firstlayer.mlx.bench import save_original

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loaded = load_source(args.source)
        save_original(loaded.model, root / "original", loaded.tokenizer)
        convert(loaded.model, root / "precomputed", tokenizer=loaded.tokenizer)
        del loaded
        print(f"{args.source}, {len(PROMPTS)} prompts x {args.new_tokens} greedy tokens")
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
                    trust_remote_code=name == "precomputed",
                )
            a = greedy(root / f"original-q{bits}", args.new_tokens, False)
            b = greedy(root / f"precomputed-q{bits}", args.new_tokens, True)
            print(f"{bits}-bit, precomputed against original: {line(a, b)}")
            # What quantization alone moves, for scale: each against the unquantized original.
            print(f"{bits}-bit original against unquantized: {line(dense, a)}")
            print(f"{bits}-bit precomputed against unquantized: {line(dense, b)}")


if __name__ == "__main__":
    main()
