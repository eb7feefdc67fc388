"""What LoRA adapters cost on a precomputed model in vLLM, against the original with the same
adapters: memory per adapter, time to load one, decode ms/step with 0, 1 and 2 active adapters.

    .venv-vllm/bin/python benchmarks/vllm_lora.py benchmarks/llama-shallow.json [--repeats 7]

A seeded random model of the config, saved as itself and converted; two rank-16 adapters (A on
q/k/v/o and the MLP of every layer the table leaves an adapter, B on q and v where allowed). Both
folders are served side by side with `enable_lora=True`, a warm-up each, then alternating pairs;
the decode step comes from vLLM's per-request token timestamps, the speed-up is the median of the
per-pair ratios with its distribution-free 95% interval (as `firstlayer bench` reports it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lora_bytes(llm) -> int:
    """Bytes of the LoRA slots vLLM keeps in the model (every adapter slot of every layer)."""
    import torch

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    total = 0
    for module in model.modules():
        for name in ("lora_a_stacked", "lora_b_stacked"):
            stacks = getattr(module, name, None)
            stacks = [stacks] if isinstance(stacks, torch.Tensor) else stacks or ()
            total += sum(t.numel() * t.element_size() for t in stacks)
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from firstlayer.conversion import convert
    from firstlayer.hf.adapters import adapter_targets
    from firstlayer.hf.loading import random_model
    from firstlayer.tools.bench import Ratio, Spread
    from firstlayer.vllm.bench import decode_ms_per_step

    config = json.loads(Path(args.config).read_text())
    model = random_model(config)
    tmp = Path(tempfile.mkdtemp(prefix="firstlayer-lora-bench-"))
    original = tmp / "original"
    model.save_pretrained(original)
    precomputed = convert(model, tmp / "precomputed")
    targets = adapter_targets(json.loads((precomputed / "config.json").read_text()))
    names = [n for n, _ in model.named_modules()]

    def allowed(leaves: list[str]) -> list[str]:
        """Every module with these names the table leaves an adapter (full names)."""
        return [n for n in names if n.rpartition(".")[2] in leaves and not targets.reason(n)]

    leaves_a = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    leaves_a += ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    adapters = {}
    for seed, (name, leaves) in enumerate(
        {"A": leaves_a, "B": ["q_proj", "v_proj", "query_key_value"]}.items()
    ):
        torch.manual_seed(seed)
        lora = LoraConfig(r=16, target_modules=allowed(leaves), init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), lora).save_pretrained(tmp / name)
        adapters[name] = LoRARequest(name, seed + 1, str(tmp / name))

    engines = {
        key: LLM(
            model=str(folder),
            dtype="float32",
            enforce_eager=True,
            max_model_len=256,
            skip_tokenizer_init=True,
            seed=0,
            disable_log_stats=False,
            kv_cache_memory_bytes=256 * 2**20,
            enable_lora=True,
            max_lora_rank=16,
            max_loras=2,
        )
        for key, folder in (("original", original), ("precomputed", precomputed))
    }
    result: dict = {"config": args.config, "repeats": args.repeats, "batch": args.batch}
    result["lora_slot_bytes"] = {k: lora_bytes(llm) for k, llm in engines.items()}
    # Time to load an adapter: add_lora of each, alternating engines, three rounds.
    load_ms: dict[str, list[float]] = {k: [] for k in engines}
    for round_ in range(3):
        for key in list(engines)[:: 1 if round_ % 2 == 0 else -1]:
            for name, request in adapters.items():
                fresh = LoRARequest(
                    f"{name}-{round_}", 100 + 10 * round_ + request.lora_int_id, request.lora_path
                )
                start = time.perf_counter()
                engines[key].llm_engine.add_lora(fresh)
                load_ms[key].append(1e3 * (time.perf_counter() - start))
                engines[key].llm_engine.remove_lora(fresh.lora_int_id)
    result["load_adapter_ms"] = {k: statistics.median(v) for k, v in load_ms.items()}
    prompts = [TokensPrompt(prompt_token_ids=list(range(5 + i, 37 + i))) for i in range(args.batch)]
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    modes = {
        "no adapter": [None] * args.batch,
        "1 adapter": [adapters["A"]] * args.batch,
        "2 adapters": [adapters["A" if i % 2 == 0 else "B"] for i in range(args.batch)],
    }
    result["decode"] = {}
    for mode, requests in modes.items():
        for llm in engines.values():  # warm-up
            llm.generate(prompts, sampling, lora_request=requests, use_tqdm=False)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for repeat in range(args.repeats):
            for key in list(engines)[:: 1 if repeat % 2 == 0 else -1]:
                outputs = engines[key].generate(
                    prompts, sampling, lora_request=requests, use_tqdm=False
                )
                times[key].append(decode_ms_per_step(outputs))
        ratio = Ratio.of(
            [o / p for o, p in zip(times["original"], times["precomputed"], strict=True)]
        )
        result["decode"][mode] = {
            "original_ms": Spread.of(times["original"]).__dict__,
            "precomputed_ms": Spread.of(times["precomputed"]).__dict__,
            "speedup": ratio.__dict__,
        }
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    del engines
    gc.collect()
    print(f"{args.config}: batch {args.batch}, {args.new_tokens} new tokens, {args.repeats} pairs")
    print(f"LoRA slot bytes (max_loras=2, rank 16): {result['lora_slot_bytes']}")
    print(f"add_lora median ms: {result['load_adapter_ms']}")
    for mode, row in result["decode"].items():
        o, p, r = row["original_ms"], row["precomputed_ms"], row["speedup"]
        print(
            f"{mode:>10}: original {o['median']:.2f} [{o['low']:.2f}-{o['high']:.2f}] ms, "
            f"precomputed {p['median']:.2f} [{p['low']:.2f}-{p['high']:.2f}] ms, "
            f"speedup {r['median']:.3f}x [{r['low']:.3f}-{r['high']:.3f}] "
            f"({100 * r['confidence']:.0f}%)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
