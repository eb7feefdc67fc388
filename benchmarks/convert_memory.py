"""Peak memory of `firstlayer convert` on a model with Gemma 3's 262,144-token vocabulary.

Builds a randomly initialised gemma3_text with the real vocabulary and a small hidden size, saves
it, converts it in a fresh process and reports that process's peak RSS next to the model's own
float32 size and next to a process that only imports what convert imports:

    .venv/bin/python benchmarks/convert_memory.py --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 262_144
IMPORTS = "import torch, transformers, firstlayer.conversion, firstlayer.hf.loading, firstlayer.cli"


def peak_rss_mib(argv: list[str]) -> float:
    """Peak RSS of a child process running argv: its ru_maxrss, read by a wrapper process."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *argv], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip()) / 1024


def build_model(folder: Path, hidden: int) -> int:
    """Save a random gemma3_text of the real vocabulary; returns its float32 bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = max(1, hidden // 64)
    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=64,
        num_hidden_layers=2,
        sliding_window=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return 4 * sum(p.numel() for p in model.parameters())


def measure(hidden: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "out"
        model_mib = build_model(source, hidden) / 2**20
        imports = peak_rss_mib([sys.executable, "-c", IMPORTS])
        convert = peak_rss_mib(
            [sys.executable, "-m", "firstlayer.cli", "convert", str(source), str(out)]
        )
        out_mib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    return {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "model_float32_mib": model_mib,
        "converted_file_mib": out_mib,
        "imports_peak_rss_mib": imports,
        "convert_peak_rss_mib": convert,
        "convert_over_imports_mib": convert - imports,
        "ratio_to_model": (convert - imports) / model_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.hidden)
    if args.json:
        print(json.dumps(result))
        return
    model, out = result["model_float32_mib"], result["converted_file_mib"]
    print(
        f"gemma3_text, vocab {VOCAB:,}, hidden {args.hidden}: model {model:,.0f} MiB in "
        f"float32, converted file {out:,.0f} MiB"
    )
    print(
        f"peak RSS: imports only {result['imports_peak_rss_mib']:,.0f} MiB, convert "
        f"{result['convert_peak_rss_mib']:,.0f} MiB: +{result['convert_over_imports_mib']:,.0f} "
        f"MiB = {result['ratio_to_model']:.2f}x the model's float32 size"
    )


if __name__ == "__main__":
    main()
