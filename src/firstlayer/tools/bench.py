"""Decode and prefill timing of a model against its precomputed twin, next to the ceilings.

Both models run the same loop (a static KV cache, greedy steps of one token per sequence, logits of
the last position only, optionally torch.compile), in alternating runs after a warm-up; medians
and min-max spreads are reported. Nothing here prints: the CLI renders a BenchResult.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.analysis.savings import analyze
from firstlayer.conversion import convert, precompute
from firstlayer.errors import FirstLayerError
from firstlayer.hf.loading import load, random_model
from firstlayer.tools.verify import weights_count

# A copy this large is far out of every cache, so its speed is the memory's.
BANDWIDTH_COPY_BYTES = 512 * 2**20
# Prompts are random ids below this (every family's vocabulary is larger).
PROMPT_ID_LIMIT = 250
# (what is being timed, steps done, steps in all)
LabelledProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median: (low, high, its confidence).

    The k-th smallest and k-th largest values bound the median with probability
    1 - 2 P(Binomial(n, 1/2) < k); k is the largest that keeps it at `confidence` or more. With
    too few values for that (n < 6 at 95%), the min-max range and the confidence it has.
    """
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n-k+1))
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


@dataclass(frozen=True)
class Ratio:
    """Original over precomputed time, one ratio per alternating pair of runs: a neighbour's load
    that slows both runs of a pair cancels out in its ratio."""

    median: float
    low: float
    high: float
    confidence: float  # of [low, high] as an interval for the median
    pairs: int

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio:
        low, high, confidence = median_interval(ratios)
        return cls(statistics.median(ratios), low, high, confidence, len(ratios))


@dataclass(frozen=True)
class Pair:
    """One measure of both models, in ms; the speed-up is original over precomputed."""

    original: Spread
    precomputed: Spread
    ratio: Ratio  # per-pair ratios of original over precomputed

    @property
    def speedup(self) -> float:
        return self.ratio.median


@dataclass(frozen=True)
class BatchResult:
    batch: int
    decode_ms: Pair  # one decode step: one new token for each of `batch` sequences
    prefill_ms: Pair  # the whole prompt batch
    decode_ceiling: float  # analyser, exact accounting: weights read per step, bytes-bound
    prefill_ceiling: float  # analyser, exact accounting: FLOPs of the prompt, compute-bound
    bytes_per_step: dict[str, int]  # weights read per decode step, from the analyser

    @property
    def decode_speedup(self) -> float:
        return self.decode_ms.speedup

    @property
    def prefill_speedup(self) -> float:
        return self.prefill_ms.speedup

    @property
    def decode_captured(self) -> float:
        """Share of the ideal gain measured: (speedup - 1) / (ceiling - 1)."""
        return captured(self.decode_speedup, self.decode_ceiling)

    @property
    def prefill_captured(self) -> float:
        return captured(self.prefill_speedup, self.prefill_ceiling)

    def tokens_per_s(self) -> dict[str, float]:
        return {
            "original": 1e3 * self.batch / self.decode_ms.original.median,
            "precomputed": 1e3 * self.batch / self.decode_ms.precomputed.median,
        }

    def achieved_bandwidth(self) -> dict[str, float]:
        """Weight bytes read per step over the step's median latency, in bytes/s."""
        return {
            "original": self.bytes_per_step["original"] / self.decode_ms.original.median * 1e3,
            "precomputed": self.bytes_per_step["precomputed"]
            / self.decode_ms.precomputed.median
            * 1e3,
        }


def captured(speedup: float, ceiling: float) -> float:
    return (speedup - 1) / (ceiling - 1) if ceiling > 1 else float("nan")


@dataclass(frozen=True)
class BenchResult:
    model: str
    device: str
    dtype: str
    threads: int
    compiled: bool
    prompt_tokens: int
    new_tokens: int
    repeats: int
    bandwidth: float  # bytes/s of a large copy on this device
    overhead_ms: float  # one decode step of the same architecture at toy width: framework cost
    # CUDA: peak allocated while each model ran; CPU, where one process holds both: weights and
    # KV cache of each (RSS cannot tell the two models apart).
    memory_bytes: dict[str, int]
    results: tuple[BatchResult, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = []
        for r in self.results:
            achieved = r.achieved_bandwidth()
            out["results"].append(
                {
                    "batch": r.batch,
                    "decode_ms": asdict(r.decode_ms),
                    "decode_tokens_per_s": r.tokens_per_s(),
                    "decode_speedup": r.decode_speedup,
                    "decode_ceiling": r.decode_ceiling,
                    "decode_captured": r.decode_captured,
                    "prefill_ms": asdict(r.prefill_ms),
                    "prefill_speedup": r.prefill_speedup,
                    "prefill_ceiling": r.prefill_ceiling,
                    "prefill_captured": r.prefill_captured,
                    "bytes_per_step": r.bytes_per_step,
                    "roofline": {k: v / self.bandwidth for k, v in achieved.items()},
                }
            )
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_COPY_BYTES, repeats: int = 5):
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


class DecodeLoop:
    """Prefill then greedy decode with a static KV cache, timing each phase."""

    def __init__(self, model: nn.Module, max_tokens: int, compile: bool):
        from transformers import StaticCache

        self.model = model
        self.device = model.get_output_embeddings().weight.device  # a host-kept table is not
        self.cache = StaticCache(config=model.config, max_cache_len=max_tokens)
        self.peak_bytes = 0  # CUDA only: the most allocated during any of this loop's runs
        # transformers 5.24 calls the cache argument `cache`; 5.19 calls it `past_key_values`
        # (an unknown keyword would vanish into **kwargs and the cache would be ignored).
        accepted = inspect.signature(model.forward).parameters
        self.cache_keyword = "cache" if "cache" in accepted else "past_key_values"
        self.step = model.forward
        if compile:
            # Two models x (prefill, decode) shapes x batch sizes share one forward code object:
            # dynamo's default of 8 recompiles would silently fall back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self.step = torch.compile(model.forward, dynamic=False)

    def next_token(self, ids: Tensor, positions: Tensor) -> Tensor:
        """One forward pass through the cache; the greedy next token of each sequence (B, 1)."""
        logits = self.step(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            **{self.cache_keyword: self.cache},
            logits_to_keep=1,
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def run(self, prompt: Tensor, new_tokens: int) -> tuple[float, list[float]]:
        """(prefill seconds, seconds of each decode step); prefill makes the first new token."""
        self.cache.reset()
        batch, length = prompt.shape
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        token = self.next_token(prompt, torch.arange(length, device=self.device).expand(batch, -1))
        synchronize(self.device)
        prefill = time.perf_counter() - start
        steps, tokens = [], [token]
        for position in range(length, length + new_tokens - 1):
            positions = torch.full((batch, 1), position, device=self.device)
            start = time.perf_counter()
            token = self.next_token(token, positions)
            synchronize(self.device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        self.tokens = torch.cat(tokens, dim=1)  # (B, new_tokens): the greedy continuation
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        return prefill, steps

    def cache_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.cache.layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, Tensor)
        )


def time_pair(
    loops: dict[str, DecodeLoop],
    prompt: Tensor,
    new_tokens: int,
    repeats: int,
    progress: Callable[[], None] | None = None,
) -> tuple[Pair, Pair]:
    """(decode ms per step, prefill ms) of both models, alternating runs after one warm-up each."""
    order = list(loops)
    for name in order:  # warm-up: allocation, lazy init, compilation; not counted
        loops[name].run(prompt, new_tokens)
    decode: dict[str, list[float]] = {name: [] for name in order}
    prefill: dict[str, list[float]] = {name: [] for name in order}
    for repeat in range(repeats):
        # A B, then B A: neither model always runs right after the other's allocations.
        for name in order if repeat % 2 == 0 else order[::-1]:
            prefill_s, steps = loops[name].run(prompt, new_tokens)
            prefill[name].append(1e3 * prefill_s)
            decode[name].append(1e3 * statistics.median(steps))
            if progress:
                progress()
    return pair_of(decode), pair_of(prefill)


def pair_of(times: dict[str, list[float]]) -> Pair:
    """Both models' times, run i of one paired with run i of the other."""
    ratios = [o / p for o, p in zip(times["original"], times["precomputed"], strict=True)]
    return Pair(Spread.of(times["original"]), Spread.of(times["precomputed"]), Ratio.of(ratios))


def toy_width(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture and depth at toy width: what is left of a step is framework cost."""
    toy = dict(config)
    heads = toy.get("num_attention_heads") or toy.get("n_head") or 4
    for key in ("hidden_size", "n_embd"):
        if key in toy:
            toy[key] = 8 * heads
    for key in ("intermediate_size", "n_inner", "ffn_hidden_size"):
        if toy.get(key):
            toy[key] = 32
    if toy.get("head_dim"):
        toy["head_dim"] = 8
    if toy.get("rotary_dim"):
        toy["rotary_dim"] = 4
    toy["vocab_size"] = 256
    return toy


def bench(
    model: nn.Module,
    name: str = "model",
    batches: Sequence[int] = (1, 4, 16),
    new_tokens: int = 32,
    prompt_tokens: int = 32,
    repeats: int = 5,
    compile: bool = False,
    progress: LabelledProgress | None = None,
) -> BenchResult:
    """Time `model` and its precomputed twin (built here, in the same process) the same way.

    The ceilings are the analyser's for the model's config, in exact accounting. The model is
    left as it is; the twin is a copy.
    """
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1 or not batches or min(batches) < 1:
        raise FirstLayerError(
            "bench needs --new-tokens >= 2 (the first comes from prefill), --prompt-tokens >= 1, "
            "--repeats >= 1 and batch sizes >= 1"
        )
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        raise FirstLayerError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's "
            f"context of {context} tokens: ask for fewer"
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    config = model.config.to_dict()
    analysis = analyze(config, accounting="exact")
    twin = precompute(copy.deepcopy(model))
    max_tokens = prompt_tokens + new_tokens
    total = len(batches) * repeats
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"{name}: batch {batch}", done, total)

    results, memory = [], {}
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        loops = {
            "original": DecodeLoop(model, max_tokens, compile),
            "precomputed": DecodeLoop(twin, max_tokens, compile),
        }
        prompt = torch.randint(0, PROMPT_ID_LIMIT, (batch, prompt_tokens), generator=generator)
        decode_ms, prefill_ms = time_pair(loops, prompt.to(device), new_tokens, repeats, tick)
        itemsize = dtype.itemsize
        results.append(
            BatchResult(
                batch=batch,
                decode_ms=decode_ms,
                prefill_ms=prefill_ms,
                decode_ceiling=analysis.decode_ceiling(batch),
                prefill_ceiling=analysis.prefill_ceiling(batch, prompt_tokens),
                bytes_per_step={
                    "original": itemsize * analysis.weights_read_per_step(batch, False),
                    "precomputed": itemsize * analysis.weights_read_per_step(batch, True),
                },
            )
        )
        for which, held in (("original", model), ("precomputed", twin)):
            loop = loops[which]
            resident = weights_count(held) * itemsize + loop.cache_bytes()
            memory[which] = max(memory.get(which, 0), loop.peak_bytes or resident)
        del loops
    toy = random_model(toy_width(config), dtype).to(device)
    toy_loop = DecodeLoop(toy, max_tokens, compile)
    toy_prompt = torch.randint(0, PROMPT_ID_LIMIT, (1, prompt_tokens), device=device)
    toy_loop.run(toy_prompt, new_tokens)
    overhead_ms = 1e3 * statistics.median(toy_loop.run(toy_prompt, new_tokens)[1])
    return BenchResult(
        model=name,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        compiled=compile,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        bandwidth=measure_bandwidth(device),
        overhead_ms=overhead_ms,
        memory_bytes=memory,
        results=tuple(results),
    )


# Table storage compared by `bench_tables`: the reference first.
TABLE_VARIANTS = ("in-memory float32", "mapped float32", "mapped int8")


@dataclass(frozen=True)
class TableBatchResult:
    batch: int
    decode_ms: dict[str, Spread]  # per variant, over its runs
    # Per variant: each run's median step over the reference's run in the same round, so that
    # a neighbour's burst slows both sides of a ratio alike; median with min-max.
    ratio: dict[str, Spread]


@dataclass(frozen=True)
class TableBenchResult:
    model: str
    device: str
    threads: int
    new_tokens: int
    prompt_tokens: int
    repeats: int
    table_bytes: dict[str, int]  # the table's stored bytes per variant
    results: tuple[TableBatchResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_tables(
    model: nn.Module,
    folder: Any,
    name: str = "model",
    batches: Sequence[int] = (1, 16),
    new_tokens: int = 32,
    prompt_tokens: int = 32,
    repeats: int = 5,
    progress: LabelledProgress | None = None,
) -> TableBenchResult:
    """Decode with the table memory-mapped (float32, and int8 dequantized per row looked up)
    against the same model with its float32 table in memory, after a warm-up, in rounds that
    run every variant once in a rotating order. `folder` is an empty scratch folder where the
    two conversions are written (and read back from).

    All three are loaded from their folders the same way: on CPU transformers maps every weight
    from the safetensors file too, so the reference is the float32 folder loaded with its table
    in host memory (`table_memory="host"`), and only where the table lives differs."""
    if new_tokens < 2 or repeats < 1 or not batches or min(batches) < 1:
        raise FirstLayerError("bench needs --new-tokens >= 2, --repeats >= 1 and batches >= 1")
    folders = {
        table_dtype: convert(model, Path(folder) / table_dtype, table_dtype=table_dtype)
        for table_dtype in ("float32", "int8")
    }
    variants = {
        TABLE_VARIANTS[0]: load(folders["float32"], table_memory="host"),
        TABLE_VARIANTS[1]: load(folders["float32"]),
        TABLE_VARIANTS[2]: load(folders["int8"]),
    }
    device = next(model.parameters()).device
    total, done = len(batches) * repeats, 0
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in batches:
        loops = {v: DecodeLoop(m, prompt_tokens + new_tokens, False) for v, m in variants.items()}
        prompt = torch.randint(0, PROMPT_ID_LIMIT, (batch, prompt_tokens), generator=generator)
        prompt = prompt.to(device)
        for loop in loops.values():  # warm-up: allocation, the pages of the rows read
            loop.run(prompt, new_tokens)
        runs: dict[str, list[float]] = {v: [] for v in loops}
        for repeat in range(repeats):
            order = list(loops)[repeat % len(loops) :] + list(loops)[: repeat % len(loops)]
            for variant in order:
                runs[variant].append(
                    1e3 * statistics.median(loops[variant].run(prompt, new_tokens)[1])
                )
            done += 1
            if progress:
                progress(f"{name}: batch {batch}", done, total)
        reference = runs[TABLE_VARIANTS[0]]
        results.append(
            TableBatchResult(
                batch=batch,
                decode_ms={v: Spread.of(ms) for v, ms in runs.items()},
                ratio={
                    v: Spread.of([a / b for a, b in zip(ms, reference, strict=True)])
                    for v, ms in runs.items()
                    if v != TABLE_VARIANTS[0]
                },
            )
        )
    return TableBenchResult(
        model=name,
        device=str(device),
        threads=torch.get_num_threads(),
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        repeats=repeats,
        table_bytes={v: table_nbytes(m) for v, m in variants.items()},
        results=tuple(results),
    )


def table_nbytes(model: nn.Module) -> int:
    table = model.get_input_embeddings()
    blocks = [table.qkv, table.qkv_scale, table.residual_scale]
    if not model.config.firstlayer["lm_head"]["reads_table"]:
        blocks.append(table.residual)
    return sum(b.numel() * b.element_size() for b in blocks if b is not None)
