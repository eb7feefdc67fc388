"""Stored size, resident memory and measured error of the table per table dtype.

For SmolLM2-135M-Instruct (`default`) and a random gemma3_text of Gemma 3 270M's shapes (the
262,144-token vocabulary, hidden 640, 18 layers, q/k/v 1,536 columns), converts the model once
per table dtype (float32, bfloat16, float16, int8; the rest of the model in float32) and reports:

- the table's bytes on disk (its blocks and int8 scales) and the folder's weights;
- resident memory (VmRSS) of a fresh process that loads the model and generates 16 tokens, next
  to the same for the original (the table is memory-mapped: only rows read become resident);
- `verify`: the table's max/mean error against float32 rows, end-to-end max/mean |logit diff|
  and argmax agreement with the float32 original, and the original's own mean in bfloat16.

    flock /tmp/bench.lock .venv/bin/python benchmarks/table_memory.py
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TABLE_DTYPES = ("float32", "bfloat16", "float16", "int8")
MIB = 2**20
RESIDENT = """
import sys, torch
from firstlayer.hf.loading import load
from firstlayer.hf.loading import load_source
path, precomputed = sys.argv[1], sys.argv[2] == "1"
model = load(path) if precomputed else load_source(path, dtype=torch.float32).model
prompt = (torch.arange(8) * 997 % model.config.vocab_size)[None]
with torch.inference_mode():
    model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


def resident_mib(path: Path | str, precomputed: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT, str(path), "1" if precomputed else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def gemma3_270m_shaped(folder: Path) -> None:
    """A seeded random gemma3_text with Gemma 3 270M's shapes, saved in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def table_bytes(folder: Path) -> int:
    from firstlayer.folder import read_record, weight_files_of
    from firstlayer.safetensors_io import read_header

    module = read_record(folder)["table"]["module"]
    total = 0
    for name in weight_files_of(folder):
        if name.endswith(".safetensors"):
            for key, (_, dtype, shape, _) in read_header(folder / name).items():
                if key.startswith(module + "."):
                    total += dtype.itemsize * math.prod(shape)
    return total


def measure(name: str, source: str, tmp: Path, table_dtypes: tuple[str, ...]) -> list[dict]:
    import torch

    from firstlayer.conversion import convert_source
    from firstlayer.hf.loading import disk_bytes, load, load_source
    from firstlayer.tools.verify import verify

    original = load_source(source, dtype=torch.float32)
    original_rss = resident_mib(source, precomputed=False)
    rows = []
    for table_dtype in table_dtypes:
        out = tmp / f"{name}-{table_dtype}"
        convert_source(source, out, torch.float32, table_dtype=table_dtype)
        report = verify(original.model, load(out), original.tokenizer, max_new_tokens=8)
        rows.append(
            {
                "model": name,
                "table_dtype": table_dtype,
                "table_mib": table_bytes(out) / MIB,
                "weights_mib": disk_bytes(out) / MIB,
                "original_weights_mib": 4
                * sum(p.numel() for p in original.model.parameters())
                / MIB,
                "resident_mib": resident_mib(out, precomputed=True),
                "original_resident_mib": original_rss,
                "table_error": report.table_error,
                "max_logit_diff": report.max_logit_diff,
                "mean_logit_diff": report.mean_logit_diff,
                "token_agreement": report.token_agreement,
                "bfloat16_original_mean_logit_diff": report.baseline_mean_logit_diff,
                "passed": report.passed,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | table dtype | table on disk | weights on disk (original f32) | resident "
        "(original) | table error max / mean | logit diff max / mean (bf16 original's mean) "
        "| argmax agreement | verify |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        error = r["table_error"]
        table = "0 (exact)" if error is None else f"{error[0]:.1e} / {error[1]:.1e}"
        base = r["bfloat16_original_mean_logit_diff"]
        lines.append(
            f"| {r['model']} | {r['table_dtype']} | {r['table_mib']:,.0f} MiB | "
            f"{r['weights_mib']:,.0f} MiB ({r['original_weights_mib']:,.0f}) | "
            f"{r['resident_mib']:,.0f} MiB ({r['original_resident_mib']:,.0f}) | {table} | "
            f"{r['max_logit_diff']:.1e} / {r['mean_logit_diff']:.1e}"
            + ("" if base is None else f" ({base:.1e})")
            + f" | {100 * r['token_agreement']:.2f}% | {'PASS' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-262k"])
    parser.add_argument("--table-dtypes", nargs="+", default=list(TABLE_DTYPES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            if name == "smollm2":
                rows += measure(name, "default", tmp, tuple(args.table_dtypes))
            else:
                gemma3_270m_shaped(tmp / "gemma3-source")
                rows += measure(name, str(tmp / "gemma3-source"), tmp, tuple(args.table_dtypes))
            for folder in tmp.glob(f"{name}-*"):
                shutil.rmtree(folder)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
