"""Every supported family at one mid-size shape: is the precomputed model ever slower?

Builds, for each test family of tests/conftest.py, a seeded random model of hidden 512, 4 layers
and a 32,000-token vocabulary (family specifics kept: head_dim, kv heads, experts, parallel or
serial), benchmarks it against its precomputed twin and prints one line per family and batch:

    .venv/bin/python benchmarks/sweep_families.py [--batch 1 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(
    hidden_size=512,
    n_embd=512,
    intermediate_size=1536,
    n_inner=1536,
    num_hidden_layers=4,
    n_layer=4,
    vocab_size=32000,
    max_position_embeddings=512,
    n_positions=512,
)


def sweep(batches: list[int]) -> list[dict]:
    import torch
    from conftest import FAMILIES
    from transformers import AutoModelForCausalLM

    from firstlayer.families import family_of
    from firstlayer.tools.bench import bench

    rows = []
    for family in FAMILIES:
        settings = {**family_of(family.model_type).tiny, **family.extra}
        settings.update(
            {
                k: v
                for k, v in SHAPE.items()
                if k in settings
                or k in ("num_hidden_layers", "vocab_size", "max_position_embeddings")
            }
        )
        if family.model_type == "gptj":
            settings = {**settings, "rotary_dim": 16}
        config = family.config().__class__(**settings)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        result = bench(
            model, family.id, batches=batches, new_tokens=16, prompt_tokens=16, repeats=5
        )
        for r in result.results:
            rows.append(
                {
                    "family": family.id,
                    "batch": r.batch,
                    "decode_speedup": r.decode_speedup,
                    "decode_ceiling": r.decode_ceiling,
                    "decode_overlaps": r.decode_ms.original.high >= r.decode_ms.precomputed.low,
                    "decode_slower_beyond_spread": r.decode_ms.precomputed.low
                    > r.decode_ms.original.high,
                    "prefill_speedup": r.prefill_speedup,
                    "prefill_ceiling": r.prefill_ceiling,
                    "prefill_slower_beyond_spread": r.prefill_ms.precomputed.low
                    > r.prefill_ms.original.high,
                }
            )
            print(
                f"{family.id:16} batch {r.batch:>2}: decode {r.decode_speedup:.3f}x "
                f"(ceiling {r.decode_ceiling:.3f}x), prefill {r.prefill_speedup:.3f}x "
                f"(ceiling {r.prefill_ceiling:.3f}x)"
                + (
                    "  SLOWER beyond spread"
                    if rows[-1]["decode_slower_beyond_spread"]
                    or rows[-1]["prefill_slower_beyond_spread"]
                    else ""
                ),
                file=sys.stderr,
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = sweep(args.batch)
    if args.json:
        print(json.dumps(rows, indent=2))
    slower = [
        r for r in rows if r["decode_slower_beyond_spread"] or r["prefill_slower_beyond_spread"]
    ]
    print(
        f"{len(rows)} family x batch cases; precomputed slower beyond the spread in "
        f"{len(slower)}: {[(r['family'], r['batch']) for r in slower]}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
