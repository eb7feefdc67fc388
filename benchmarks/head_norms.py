"""Decode cost of running layer 0's q/k norms at run time (format 6, which makes a LoRA on q/k
exact) against the same table with the norms folded in (what folders before format 6 hold).

A seeded random model of CONFIG (norm gains perturbed, as trained ones are) is converted once;
the folder is rewritten as format 5 (the norms applied to its q/k columns, as the converter did
before) beside it, and the original, the format-5 and the format-6 model are timed in one
process through `firstlayer bench`'s decode loop (static cache, greedy, 32 + 32 tokens), in
rotating order after a warm-up. Per batch: each model's median decode step with its min-max,
and the paired ratios (run i of one over run i of the other) with their 95% intervals.

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/head_norms.py \\
        benchmarks/qwen3-shallow.json --batch 1 4 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import with_head_norms_folded  # noqa: E402  (the format-5 rewrite the tests use)

from firstlayer.conversion import convert  # noqa: E402
from firstlayer.hf.loading import load, random_model  # noqa: E402
from firstlayer.tools.bench import DecodeLoop, Ratio  # noqa: E402

TOKENS = 32  # prompt and new tokens each
PAIRS = (("original", "format 5"), ("original", "format 6"), ("format 5", "format 6"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model = random_model(json.loads(Path(args.config).read_text()))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    root = Path(tempfile.mkdtemp())
    folder = convert(model, root / "format6")
    old = with_head_norms_folded(folder, root / "format5", model)
    models = {
        "original": model,
        "format 5": load(old, table_memory="device"),
        "format 6": load(folder, table_memory="device"),
    }
    print(f"{args.config}, {torch.get_num_threads()} thread(s), {args.repeats} runs per model")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch:
        prompt = torch.randint(0, 200, (batch, TOKENS), generator=generator)
        loops = {name: DecodeLoop(m, 2 * TOKENS, False) for name, m in models.items()}
        for loop in loops.values():  # warm-up
            loop.run(prompt, TOKENS)
        assert all(torch.equal(loops["original"].tokens, loop.tokens) for loop in loops.values())
        steps_ms: dict[str, list[float]] = {name: [] for name in loops}
        names = list(loops)
        for run in range(args.repeats):
            order = names[run % 3 :] + names[: run % 3]
            for name in order if run % 2 == 0 else order[::-1]:
                steps_ms[name].append(1e3 * statistics.median(loops[name].run(prompt, TOKENS)[1]))
        times = ", ".join(
            f"{name} {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]"
            for name, v in steps_ms.items()
        )
        print(f"batch {batch}: decode ms/step {times}")
        for a, b in PAIRS:
            ratio = Ratio.of([x / y for x, y in zip(steps_ms[a], steps_ms[b], strict=True)])
            print(
                f"  {a} / {b}: {ratio.median:.3f}x [{ratio.low:.3f}-{ratio.high:.3f}] "
                f"({ratio.confidence:.0%} interval, {ratio.pairs} pairs)"
            )


if __name__ == "__main__":
    main()
