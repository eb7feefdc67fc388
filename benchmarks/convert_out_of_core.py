"""Out-of-core conversion of a checkpoint with Llama-3-70B's shapes, next to a plain copy of it.

Writes a synthetic bfloat16 checkpoint with Llama-3-70B's dimensions (hidden 8192, 64 heads,
8 kv heads, FFN 28672, vocabulary 128,256, untied LM head) but 8 layers: about 18 GB in 5 GB
shards. Then copies the folder (`shutil.copytree`, timed, deleted again) from a cold page cache
and again from a warm one, and converts it with `firstlayer convert` in a fresh process from a
cold cache, reporting that process's wall time and peak RSS (its VmHWM). A checkpoint larger
than memory is read from disk, never from the page cache; this 18 GB stand-in would fit in a
24 GB machine's cache, so the caches are dropped before the timed runs (root only; otherwise
every figure is warm and says so). Everything is removed at the end, also on failure or Ctrl-C:

    .venv/bin/python benchmarks/convert_out_of_core.py [--layers 8] [--dir /tmp]

The weights are one random block of values repeated: conversion speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from firstlayer.safetensors_io import TensorSpec, write_sharded

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 8192, 64, 8, 28672, 128_256
HEAD_DIM = HIDDEN // HEADS
BLOCK_ELEMENTS = 32 * 2**20  # one random block, tiled over every tensor

CONVERT = """
import sys, time
from firstlayer.cli import main
start = time.perf_counter()
code = main(["convert", sys.argv[1], sys.argv[2]])
wall = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT", code, wall, peak * 1024)
"""


def llama_70b_shapes(layers: int) -> list[TensorSpec]:
    def spec(name: str, *shape: int) -> TensorSpec:
        return TensorSpec(name, torch.bfloat16, shape)

    specs = [spec("model.embed_tokens.weight", VOCAB, HIDDEN)]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [
            spec(f"{p}.input_layernorm.weight", HIDDEN),
            spec(f"{p}.self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN),
            spec(f"{p}.self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN),
            spec(f"{p}.self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN),
            spec(f"{p}.self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM),
            spec(f"{p}.post_attention_layernorm.weight", HIDDEN),
            spec(f"{p}.mlp.gate_proj.weight", FFN, HIDDEN),
            spec(f"{p}.mlp.up_proj.weight", FFN, HIDDEN),
            spec(f"{p}.mlp.down_proj.weight", HIDDEN, FFN),
        ]
    return specs + [spec("model.norm.weight", HIDDEN), spec("lm_head.weight", VOCAB, HIDDEN)]


def write_checkpoint(folder: Path, layers: int) -> int:
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN,
        "vocab_size": VOCAB,
        "num_hidden_layers": layers,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    block = (torch.randn(BLOCK_ELEMENTS, generator=generator) * 0.02).to(torch.bfloat16)
    specs = llama_70b_shapes(layers)

    def chunks():
        for spec in specs:
            left = spec.numel
            while left:
                n = min(left, BLOCK_ELEMENTS)
                yield spec.name, block[:n]
                left -= n

    write_sharded(folder, specs, [chunks()], {"format": "pt"}, "5GB")
    return sum(spec.nbytes for spec in specs)


def drop_page_cache() -> bool:
    """Write back and drop the page cache, so that the next read comes from disk (root only)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed_copy(root: Path, cold: bool) -> float:
    if cold:
        drop_page_cache()
    start = time.perf_counter()
    shutil.copytree(root / "source", root / "copy")
    subprocess.run(["sync"], check=True)  # the copy is on disk, as the conversion's output is
    seconds = time.perf_counter() - start
    shutil.rmtree(root / "copy")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (~57 GB)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="firstlayer-70b-", dir=args.dir))
    try:
        start = time.perf_counter()
        checkpoint_bytes = write_checkpoint(root / "source", args.layers)
        print(
            f"synthetic checkpoint: {checkpoint_bytes / 1e9:.1f} GB in "
            f"{len(list((root / 'source').glob('*.safetensors')))} shards, written in "
            f"{time.perf_counter() - start:.0f} s"
        )
        cold = drop_page_cache()
        state = "cold page cache" if cold else "WARM page cache (cannot drop it without root)"
        copy_s = timed_copy(root, cold)
        warm_copy_s = timed_copy(root, False)
        print(f"plain copy (shutil.copytree + sync): {copy_s:.1f} s from a {state}")
        print(f"plain copy from a warm page cache: {warm_copy_s:.1f} s")
        if cold:
            drop_page_cache()
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CONVERT, str(root / "source"), str(root / "out")],
            capture_output=True,
            text=True,
        )
        subprocess.run(["sync"], check=True)  # the output on disk, as the copy's
        wall_s = time.perf_counter() - start
        line = next((s for s in result.stdout.splitlines() if s.startswith("RESULT")), None)
        if line is None:
            sys.exit(f"convert failed:\n{result.stdout}\n{result.stderr[-3000:]}")
        code, peak = line.split()[1], line.split()[3]
        out_bytes = sum(f.stat().st_size for f in (root / "out").iterdir())
        print("\n".join(s for s in result.stdout.splitlines() if not s.startswith("RESULT")))
        print(
            f"firstlayer convert ({state}; start-up, imports and sync included): exit {code}, "
            f"{wall_s:.1f} s ({wall_s / copy_s:.2f}x the copy; target <= 2x; "
            f"{wall_s / warm_copy_s:.2f}x the warm copy), peak RSS "
            f"{int(peak) / 2**30:.2f} GiB ({int(peak) / checkpoint_bytes:.1%} of the checkpoint; "
            f"target <= 2.5 GB), output {out_bytes / 1e9:.1f} GB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
