"""Decode speed in vLLM: the original folder against the precomputed one, in the same protocol as
`firstlayer.bench` (both alive, a warm-up each, alternating runs, ceilings from the analyser),
next to the transformers loop on the same models.

A decode step's time is read from vLLM's own per-request timestamps (first and last token, in
the engine core), so prefill, scheduling of the first step and the Python front end are left out.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firstlayer.analysis.savings import analyze
from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.hf.loading import save_source
from firstlayer.tools.bench import (
    PROMPT_ID_LIMIT,
    LabelledProgress,
    Pair,
    bench,
    captured,
    pair_of,
)

KV_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class EngineBatch:
    batch: int
    decode_ms: Pair  # one decode step of `batch` sequences in vLLM
    decode_ceiling: float  # analyser, exact accounting
    transformers_tokens_per_s: dict[str, float]  # the transformers loop on the same two models

    @property
    def decode_speedup(self) -> float:
        return self.decode_ms.speedup

    @property
    def decode_captured(self) -> float:
        return captured(self.decode_speedup, self.decode_ceiling)

    def tokens_per_s(self) -> dict[str, float]:
        return {
            "original": 1e3 * self.batch / self.decode_ms.original.median,
            "precomputed": 1e3 * self.batch / self.decode_ms.precomputed.median,
        }


@dataclass(frozen=True)
class EngineBenchResult:
    model: str
    engine: str
    dtype: str
    compiled: bool
    prompt_tokens: int
    new_tokens: int
    repeats: int
    results: tuple[EngineBatch, ...]
    timing: str = "vLLM's per-request token timestamps"  # what a decode step is read from

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, r in zip(out["results"], self.results, strict=True):
            row.update(
                decode_speedup=r.decode_speedup,
                decode_captured=r.decode_captured,
                decode_tokens_per_s=r.tokens_per_s(),
            )
        return out


def decode_ms_per_step(outputs: Sequence[Any]) -> float:
    """Median over the batch's requests of (last token - first token) / steps, in ms."""
    per_request = []
    for output in outputs:
        stats = output.metrics
        steps = 0 if stats is None else stats.num_generation_tokens - 1
        if steps < 1 or not stats.last_token_ts:
            raise FirstLayerError(
                "vLLM returned no token timestamps (is log_stats disabled?): start the engine "
                "with disable_log_stats=False and ask for at least 2 new tokens"
            )
        per_request.append(1e3 * (stats.last_token_ts - stats.first_token_ts) / steps)
    return statistics.median(per_request)


def speculative_counters(llm: Any) -> dict[str, Any]:
    """vLLM's speculative-decoding counters of an engine (drafts, draft tokens, accepted tokens,
    accepted per position), by name without the `vllm:spec_decode_` prefix."""
    from vllm.v1.metrics.reader import Vector

    return {
        m.name.removeprefix("vllm:spec_decode_"): m.values if isinstance(m, Vector) else m.value
        for m in llm.get_metrics()
        if m.name.startswith("vllm:spec_decode")
    }


def start_engine(folder: Path, dtype: str, compile: bool, max_model_len: int, max_seqs: int):
    from vllm import LLM

    return LLM(
        model=str(folder),
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_seqs,
        enforce_eager=not compile,
        disable_log_stats=False,  # keeps the per-request timestamps
        skip_tokenizer_init=True,
        seed=0,
        # Both engines stay alive side by side: each gets a fixed KV cache rather than a share
        # of the memory the other has not taken yet.
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )


def bench_vllm(
    model: nn.Module,
    name: str = "model",
    batches: Sequence[int] = (1, 16),
    new_tokens: int = 64,
    prompt_tokens: int = 32,
    repeats: int = 7,
    compile: bool = False,
    progress: LabelledProgress | None = None,
) -> EngineBenchResult:
    """Time `model` and its precomputed twin in vLLM; both folders are written to a temporary
    directory (the original with save_pretrained, the twin with firstlayer convert)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if new_tokens < 3 or repeats < 1 or not batches or min(batches) < 1:
        raise FirstLayerError("bench --engine vllm needs --new-tokens >= 3, --repeats >= 1")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    generator = torch.Generator().manual_seed(0)
    prompts = {
        batch: [
            TokensPrompt(prompt_token_ids=row.tolist())
            for row in torch.randint(
                0, PROMPT_ID_LIMIT, (batch, prompt_tokens), generator=generator
            )
        ]
        for batch in batches
    }
    sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    total, done = len(batches) * repeats, 0
    decode: dict[int, Pair] = {}
    with tempfile.TemporaryDirectory(prefix="firstlayer-vllm-bench-") as tmp:
        folders = {"original": Path(tmp) / "original", "precomputed": Path(tmp) / "precomputed"}
        save_source(model, folders["original"])
        convert(model, folders["precomputed"])
        engines = {
            key: start_engine(folder, dtype, compile, prompt_tokens + new_tokens, max(batches))
            for key, folder in folders.items()
        }
        try:
            for batch in batches:
                for llm in engines.values():  # warm-up, not counted
                    llm.generate(prompts[batch], sampling, use_tqdm=False)
                times: dict[str, list[float]] = {key: [] for key in engines}
                for repeat in range(repeats):
                    order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
                    for key in order:
                        outputs = engines[key].generate(prompts[batch], sampling, use_tqdm=False)
                        times[key].append(decode_ms_per_step(outputs))
                    done += 1
                    if progress:
                        progress(f"{name} in vLLM: batch {batch}", done, total)
                decode[batch] = pair_of(times)
        finally:
            for llm in engines.values():
                llm.llm_engine.engine_core.shutdown()
            del engines
            gc.collect()
    from vllm import __version__

    return engine_result(
        model, name, decode, prompt_tokens, new_tokens, repeats, f"vLLM {__version__}", compile
    )


def engine_result(
    model: nn.Module,
    name: str,
    decode: dict[int, Pair],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    engine: str,
    compiled: bool,
    timing: str = EngineBenchResult.timing,
) -> EngineBenchResult:
    """An engine's decode times per batch, next to the analyser's ceilings and the transformers
    loop on the same model, same prompts and lengths (run after the engine, on every core)."""
    analysis = analyze(model.config.to_dict(), accounting="exact")
    reference = bench(
        model,
        name,
        batches=list(decode),
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        repeats=max(3, repeats // 2),
    )
    results = tuple(
        EngineBatch(
            batch=batch,
            decode_ms=times,
            decode_ceiling=analysis.decode_ceiling(batch),
            transformers_tokens_per_s=r.tokens_per_s(),
        )
        for (batch, times), r in zip(decode.items(), reference.results, strict=True)
    )
    return EngineBenchResult(
        model=name,
        engine=engine,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        compiled=compiled,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        results=results,
        timing=timing,
    )
