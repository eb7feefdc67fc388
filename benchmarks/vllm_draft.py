"""A precomputed draft model in vLLM's speculative decoding: the target's decode speed with the
original draft against the same draft converted, next to the analyser's ceiling.

    .venv-vllm/bin/python benchmarks/vllm_draft.py benchmarks/llama-deep.json \
        benchmarks/llama-shallow.json [--repeats 9] [--new-tokens 32] [--draft-tokens 3]

Seeded random models of both configs (they must share the vocabulary size); the target is saved
as itself, the draft as itself and converted. Two engines serve the target side by side, one with
each draft (`speculative_config={"method": "draft_model", ...}`), at batch 1, the draft's case;
a warm-up each, then alternating pairs. A decode step is read from vLLM's per-request token
timestamps; the speed-up is the median of the per-pair ratios of target tokens/s with its 95%
interval, as `firstlayer bench` reports it. Both engines must give the same tokens and the same
acceptance counts, or the script fails: a precomputed draft proposes what the original proposes.

Ceiling, bytes-bound, from the analyser (exact accounting): one speculative round reads the
draft's weights once per drafted token and the target's once (it verifies all of them in one
pass), so with k drafted tokens it saves k x (the draft's eliminated reads) of
k x draft + target. Random weights accept next to nothing: each round then yields one token,
and the speed-up of a round is the speed-up of a token; a trained draft accepts more tokens per
round, not a different share of the round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tokens_per_s(outputs) -> float:
    """Target tokens per second after the first, median over the batch's requests."""
    from firstlayer.vllm.bench import decode_ms_per_step

    return 1e3 / decode_ms_per_step(outputs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from firstlayer.analysis.savings import analyze
    from firstlayer.conversion import convert
    from firstlayer.hf.loading import random_model
    from firstlayer.tools.bench import Ratio, Spread
    from firstlayer.vllm.bench import speculative_counters

    configs = {
        key: json.loads(Path(path).read_text())
        for key, path in vars(args).items()
        if key in ("target", "draft")
    }
    if configs["target"]["vocab_size"] != configs["draft"]["vocab_size"]:
        raise SystemExit("the draft must share the target's vocabulary size")
    tmp = Path(tempfile.mkdtemp(prefix="firstlayer-draft-bench-"))
    target, draft = random_model(configs["target"]), random_model(configs["draft"])
    target.save_pretrained(tmp / "target")
    draft.save_pretrained(tmp / "draft-original")
    convert(draft, tmp / "draft-precomputed")
    del target, draft
    gc.collect()

    k = args.draft_tokens
    target_reads = analyze(configs["target"], accounting="exact").weights_read_per_step(1, False)
    drafted = analyze(configs["draft"], accounting="exact")
    draft_reads = {p: drafted.weights_read_per_step(1, p) for p in (False, True)}
    round_reads = {p: k * draft_reads[p] + target_reads for p in (False, True)}
    ceiling = round_reads[False] / round_reads[True]
    draft_share = k * draft_reads[False] / round_reads[False]

    engines = {
        key: LLM(
            model=str(tmp / "target"),
            dtype="float32",
            enforce_eager=True,
            max_model_len=args.prompt_tokens + args.new_tokens + k + 8,
            skip_tokenizer_init=True,
            seed=0,
            disable_log_stats=False,  # per-request timestamps and the speculative counters
            kv_cache_memory_bytes=256 * 2**20,
            speculative_config=dict(
                method="draft_model", model=str(tmp / f"draft-{key}"), num_speculative_tokens=k
            ),
        )
        for key in ("original", "precomputed")
    }
    generator = torch.Generator().manual_seed(0)
    vocab_size = configs["target"]["vocab_size"]
    ids = torch.randint(3, vocab_size, (args.prompt_tokens,), generator=generator)
    prompt = [TokensPrompt(prompt_token_ids=ids.tolist())]
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    answers = {key: llm.generate(prompt, sampling, use_tqdm=False) for key, llm in engines.items()}
    same_tokens = len({tuple(a[0].outputs[0].token_ids) for a in answers.values()}) == 1
    speed: dict[str, list[float]] = {key: [] for key in engines}
    for repeat in range(args.repeats):
        for key in list(engines)[:: 1 if repeat % 2 == 0 else -1]:
            speed[key].append(tokens_per_s(engines[key].generate(prompt, sampling, use_tqdm=False)))
    counters = {key: speculative_counters(llm) for key, llm in engines.items()}
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    del engines
    gc.collect()

    ratio = Ratio.of([p / o for o, p in zip(speed["original"], speed["precomputed"], strict=True)])
    result = {
        "target": args.target,
        "draft": args.draft,
        "draft_tokens": k,
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "same_tokens": same_tokens,
        "counters": counters,
        "target_tokens_per_s": {key: Spread.of(v).__dict__ for key, v in speed.items()},
        "speedup": ratio.__dict__,
        "ceiling": ceiling,
        "draft_share_of_round_reads": draft_share,
        "draft_decode_ceiling": drafted.decode_ceiling(1),
    }
    print(
        f"target {args.target}, draft {args.draft}, {k} drafted tokens per round, batch 1, "
        f"{args.new_tokens} new tokens, {args.repeats} pairs"
    )
    print(f"same tokens with either draft: {same_tokens}")
    for key, found in counters.items():
        print(
            f"  {key} draft: drafts {found.get('num_drafts')}, drafted "
            f"{found.get('num_draft_tokens')}, accepted {found.get('num_accepted_tokens')}"
        )
    for key, values in speed.items():
        s = Spread.of(values)
        print(f"  target tokens/s, {key} draft: {s.median:.1f} [{s.low:.1f}-{s.high:.1f}]")
    print(
        f"speed-up {ratio.median:.3f}x [{ratio.low:.3f}-{ratio.high:.3f}] "
        f"({100 * ratio.confidence:.0f}%); ceiling {ceiling:.4f}x (the draft reads "
        f"{100 * draft_share:.1f}% of a round's weights; its own decode ceiling "
        f"{drafted.decode_ceiling(1):.3f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    same_counts = counters["original"] == counters["precomputed"]
    if not (same_tokens and same_counts):
        print("FAIL: the precomputed draft changed the tokens or the acceptance counts")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
