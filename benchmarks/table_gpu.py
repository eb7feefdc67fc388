"""Accelerator memory and decode speed with the table in host memory, on a CUDA device.

Converts a model (default: SmolLM2-135M-Instruct; or a folder) with a float32 and an int8 table,
loads each with the table on the device, memory-mapped on the host, and pinned on the host, and
reports per case the CUDA memory allocated after loading (and the peak while loading), the peak
while generating, and the
median decode step (ms) of 64 greedy tokens at batch 1 and 16:

    .venv/bin/python benchmarks/table_gpu.py [SOURCE]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from firstlayer.conversion import convert_source
from firstlayer.hf.loading import load
from firstlayer.table.lookup import TABLE_MEMORY

MIB = 2**20


def decode_ms(model: torch.nn.Module, batch: int, new_tokens: int = 64) -> float:
    prompt = (torch.arange(16 * batch) * 997 % model.config.vocab_size).view(batch, 16).cuda()
    steps = []

    class Timer:  # a streamer is called once per new token
        def put(self, _: torch.Tensor) -> None:
            torch.cuda.synchronize()
            steps.append(time.perf_counter())

        def end(self) -> None:
            pass

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(prompt, **settings)  # warm-up
        if batch == 1:
            model.generate(prompt, streamer=Timer(), **settings)
            gaps = [1e3 * (b - a) for a, b in zip(steps[1:], steps[2:], strict=False)]
            return statistics.median(gaps)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, **settings)
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start) / new_tokens


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/table_gpu.py needs a CUDA device")
    source = sys.argv[1] if len(sys.argv) > 1 else "default"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for table_dtype in ("float32", "int8"):
            out = Path(tmp) / table_dtype
            convert_source(source, out, torch.float32, table_dtype=table_dtype)
            for memory in TABLE_MEMORY:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                model = load(out, dtype="bfloat16", device="cuda", table_memory=memory)
                row = {"table_dtype": table_dtype, "table_memory": memory}
                row["allocated_mib"] = torch.cuda.memory_allocated() / MIB
                # transformers' loader puts every weight on the device first; the table leaves.
                row["load_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
                torch.cuda.reset_peak_memory_stats()
                for batch in (1, 16):
                    row[f"decode_ms_batch_{batch}"] = decode_ms(model, batch)
                row["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
