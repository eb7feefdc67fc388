"""Plain-text renderings of verify and bench results (the CLI prints them)."""

from __future__ import annotations

from firstlayer.bench import TABLE_VARIANTS, BenchResult, TableBenchResult
from firstlayer.verify import (
    FLOAT32_LOGIT_TOLERANCE,
    REDUCED_PRECISION_LOGIT_FACTOR,
    VerifyReport,
)

GB = 1e9


def format_verify(
    report: VerifyReport,
    predicted_change: int | None,
    disk_bytes: tuple[int, int] | None,
    source_note: str = "",
) -> str:
    """The verify report: logits, tokens, parameters and bytes before and after, and a verdict."""
    change = report.params_after - report.params_before
    lines = [
        f"model / table dtype  {report.dtype} / {report.table_dtype}",
        f"max |logit diff|     {report.max_logit_diff:.2e}"
        + (
            f"   (bound {FLOAT32_LOGIT_TOLERANCE:.0e})"
            if report.baseline_max_logit_diff is None
            else ""
        ),
        f"mean |logit diff|    {report.mean_logit_diff:.2e}",
    ]
    if report.table_error is not None:
        (table_max, table_mean), (own_max, own_mean) = (
            report.table_error,
            report.baseline_layer0_error,
        )
        base = report.baseline_dtype
        lines += [
            f"original in {base}:  max {report.baseline_max_logit_diff:.2e}, mean "
            f"{report.baseline_mean_logit_diff:.2e} against float32"
            + (
                f" (both models carry the other layers' {base} rounding)"
                if base == report.dtype
                else f" (bound on the mean: {REDUCED_PRECISION_LOGIT_FACTOR}x this)"
            ),
            f"layer 0 vs float32   table ({report.table_dtype}) max {table_max:.2e}, mean "
            f"{table_mean:.2e}; the original's own {base} arithmetic max {own_max:.2e}, mean "
            f"{own_mean:.2e}",
        ]
    lines += [
        f"token agreement      {100 * report.token_agreement:.2f}% (argmax at every position)",
        f"greedy continuation  {100 * report.greedy_agreement:.2f}% of {report.greedy_tokens} "
        f"new tokens per prompt identical ({'all' if report.greedy_equal else 'not all'})",
        f"parameters           {report.params_before:,} -> {report.params_after:,} ({change:+,})",
    ]
    if predicted_change is not None:
        agree = "matches" if predicted_change == change else "DIFFERS FROM"
        lines.append(
            f"                     {agree} `analyze --accounting exact`: {predicted_change:+,}"
        )
    if disk_bytes is not None:
        before, after = disk_bytes
        lines.append(
            f"bytes on disk        {before:,} -> {after:,} ({after - before:+,})" + source_note
        )
    lines.append("PASS" if report.passed else "FAIL")
    return "\n".join(lines)


def format_bench(result: BenchResult) -> str:
    """Per batch: decode and prefill speed-up next to its ceiling, and the share captured."""
    head = (
        f"{result.model} on {result.device} ({result.threads} threads), {result.dtype}, "
        f"{'torch.compile' if result.compiled else 'eager'}, static KV cache; "
        f"prompt {result.prompt_tokens} tokens, {result.new_tokens} new tokens, "
        f"{result.repeats} alternating runs per model after a warm-up; times: medians [min-max]; "
        "speed-up: median of the per-pair ratios [its 95% interval]"
    )
    rows = _phase_rows(result, "decode", "decode ms/step: original", tokens_per_s=True)
    prefill = _phase_rows(result, "prefill", "prefill ms: original", tokens_per_s=False)
    roof = [
        f"memory bandwidth (a {result.bandwidth / GB:.1f} GB/s copy): weight bytes read per "
        "decode step / step latency, as a share of it"
    ]
    for r in result.results:
        achieved = r.achieved_bandwidth()
        roof.append(
            f"{r.batch:>5}  original {achieved['original'] / GB:6.2f} GB/s "
            f"({100 * achieved['original'] / result.bandwidth:4.1f}%)   precomputed "
            f"{achieved['precomputed'] / GB:6.2f} GB/s "
            f"({100 * achieved['precomputed'] / result.bandwidth:4.1f}%)"
        )
    step = result.results[0].decode_ms.original.median
    overhead = (
        f"framework overhead: {result.overhead_ms:.2f} ms per decode step (the same architecture "
        f"at toy width), {100 * result.overhead_ms / step:.1f}% of the batch-"
        f"{result.results[0].batch} step"
    )
    what = "weights + KV cache" if result.device == "cpu" else "peak allocated"
    memory = (
        f"memory ({what}): original {result.memory_bytes['original'] / 2**20:,.1f} "
        f"MiB, precomputed {result.memory_bytes['precomputed'] / 2**20:,.1f} MiB"
    )
    ceilings = (
        "ceilings: analyze --accounting exact for this model; decode bytes-bound (weights read "
        "per step), prefill FLOPs-bound (the LM head at the last position only, as generate() "
        "does); captured = (speedup - 1) / (ceiling - 1). Norms, activations and biases are not "
        "counted, so a measured speed-up can pass its ceiling where that work matters."
    )
    return "\n\n".join(
        [head, "\n".join(rows), "\n".join(prefill), "\n".join(roof), overhead, memory, ceilings]
    )


def _phase_rows(result: BenchResult, phase: str, title: str, tokens_per_s: bool) -> list[str]:
    header = (
        f"{'batch':>5}  {title:>26}  {'precomputed':>21}  {'speedup [interval]':>25}  "
        f"{'ceiling':>7}  {'captured':>8}"
        + (f"  {'tok/s orig':>10}  {'tok/s pre':>9}" if tokens_per_s else "")
    )
    rows = [header]
    for r in result.results:
        timing = getattr(r, f"{phase}_ms")
        row = (
            f"{r.batch:>5}  {_spread(timing.original):>26}  {_spread(timing.precomputed):>21}  "
            f"{_ratio(timing.ratio):>25}  {getattr(r, f'{phase}_ceiling'):>6.4f}x  "
            f"{_share(getattr(r, f'{phase}_captured')):>8}"
        )
        if tokens_per_s:
            tps = r.tokens_per_s()
            row += f"  {tps['original']:>10.1f}  {tps['precomputed']:>9.1f}"
        rows.append(row)
    return rows


def _ratio(ratio) -> str:
    """1.0123x [1.0010-1.0300]; the interval's confidence when too few pairs reach 95%."""
    text = f"{ratio.median:.4f}x [{ratio.low:.4f}-{ratio.high:.4f}]"
    return text if ratio.confidence >= 0.95 else f"{text} {100 * ratio.confidence:.0f}%"


def _spread(spread) -> str:
    return f"{spread.median:.2f} [{spread.low:.2f}-{spread.high:.2f}]"


def _share(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.0f}%"


def format_engine_bench(result) -> str:
    """vLLM's decode speed-up per batch next to its ceiling, and both engines' tokens/s."""
    head = (
        f"{result.model} in {result.engine}, {result.dtype}, "
        f"{'compiled' if result.compiled else 'eager'}; prompt {result.prompt_tokens} tokens, "
        f"{result.new_tokens} new tokens, {result.repeats} alternating pairs after a warm-up; "
        "decode step from vLLM's per-request token timestamps; times: medians [min-max]; "
        "speed-up: median of the per-pair ratios [its 95% interval]"
    )
    header = (
        f"{'batch':>5}  {'decode ms/step: original':>26}  {'precomputed':>21}  "
        f"{'speedup [interval]':>25}  {'ceiling':>7}  {'captured':>8}  "
        f"{'vLLM tok/s orig':>15}  {'pre':>7}  {'transformers tok/s orig':>23}  {'pre':>7}"
    )
    rows = [header]
    for r in result.results:
        timing, engine, loop = r.decode_ms, r.tokens_per_s(), r.transformers_tokens_per_s
        rows.append(
            f"{r.batch:>5}  {_spread(timing.original):>26}  {_spread(timing.precomputed):>21}  "
            f"{_ratio(timing.ratio):>25}  {r.decode_ceiling:>6.4f}x  "
            f"{_share(r.decode_captured):>8}  {engine['original']:>15.1f}  "
            f"{engine['precomputed']:>7.1f}  {loop['original']:>23.1f}  {loop['precomputed']:>7.1f}"
        )
    note = (
        "ceilings: analyze --accounting exact (decode bytes-bound); captured = (speedup - 1) / "
        "(ceiling - 1). transformers tok/s: `firstlayer bench` on the same models, same prompts "
        "and lengths, after the engines were shut down."
    )
    return "\n\n".join([head, "\n".join(rows), note])


def format_table_bench(result: TableBenchResult) -> str:
    """Per batch: each table variant's decode step, and its ratio to the in-memory table."""
    reference = TABLE_VARIANTS[0]
    lines = [
        f"{result.model} on {result.device} ({result.threads} threads), float32 model, eager; "
        f"prompt {result.prompt_tokens} tokens, {result.new_tokens} new tokens; "
        f"{result.repeats} rounds of every variant after a warm-up; medians [min-max]",
        "table bytes: "
        + ", ".join(f"{v} {n / 2**20:,.1f} MiB" for v, n in result.table_bytes.items()),
        f"{'batch':>5}  {'table':<18} {'decode ms/step':>24}  {'ratio to ' + reference:>32}",
    ]
    for r in result.results:
        for variant, ms in r.decode_ms.items():
            ratio = r.ratio.get(variant)
            shown = (
                "(reference)"
                if ratio is None
                else f"{ratio.median:.3f}x [{ratio.low:.3f}-{ratio.high:.3f}]"
                + (" slower" if ratio.low > 1 else "")
            )
            lines.append(
                f"{r.batch:>5}  {variant:<18} {ms.median:9.2f} [{ms.low:.2f}-{ms.high:.2f}]"
                f"  {shown:>32}"
            )
    lines.append(
        "a ratio is a variant's run over the reference's run of the same round; `slower` marks "
        "one whose every ratio is above 1"
    )
    return "\n".join(lines)
