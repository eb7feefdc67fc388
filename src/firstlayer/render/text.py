"""Every text the tool prints: the analyser's tables, the families list, verify's and bench's
reports, a converted folder in one line. Nothing here imports torch or computes anything; the
numbers come in the results' own objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from firstlayer.analysis.placement import TABLE_DTYPE_BYTES, placements
from firstlayer.analysis.quantization import MODEL_DTYPE_BYTES
from firstlayer.errors import FirstLayerError
from firstlayer.families import STATUSES, SUPPORTED, family_rows, listed_families

if TYPE_CHECKING:
    from firstlayer.analysis.dims import ModelDims
    from firstlayer.analysis.placement import Placement
    from firstlayer.analysis.savings import Analysis, Report
    from firstlayer.tools.bench import BenchResult, TableBenchResult
    from firstlayer.tools.verify import VerifyReport

MINUS = "\u2212"  # the paper prints negative numbers with a minus sign, not a hyphen
GB = 1e9


# --- firstlayer analyze ----------------------------------------------------------------------


def format_report(report: Report) -> str:
    """The configuration table, the savings table and the whole-model section, as plain text;
    for quantized checkpoints, their bytes too."""
    parts = [
        format_config_table(report.config_models),
        format_savings_table(report.savings_models),
        format_whole_model(report.models),
    ]
    if any(a.is_quantized for a in report.models):
        parts.append(format_weight_bytes(report.models))
    return "\n\n".join(parts)


def format_config_table(analyses: Sequence[Analysis]) -> str:
    """The paper's configuration table; exact accounting adds the rows that explain its counts."""
    exact = _is_exact(analyses)
    shapes = [
        ("parallel attention/FFN", lambda m: m.architecture),
        ("attention", lambda m: m.attention),
        ("d, n_layers", lambda m: f"{m.d:,}, {m.n_layers}"),
        ("n_heads, n_kv_heads", lambda m: f"{m.n_heads}, {m.n_kv_heads}"),
        *_when(exact, ("q_dim, head_dim", lambda m: f"{m.q_dim:,}, {m.head_dim}")),
        ("e", lambda m: f"{m.e:,}"),
        ("FFN type, hidden", lambda m: f"{m.ffn_type}, {m.ffn_hidden:,}"),
        ("experts", lambda m: _experts(m, exact)),
        ("vocab_size", lambda m: f"{m.vocab_size:,}"),
        *_when(
            exact,
            ("tied embeddings", lambda m: "yes" if m.is_tied else "no"),
            ("norms per layer", lambda m: f"{m.extras.norms_per_layer} x {m.norm_kind}"),
            ("biases", _biases),
        ),
    ]
    rows = [(label, lambda a, cell=cell: cell(a.dims)) for label, cell in shapes]
    rows += [
        ("Q+P weights per layer", lambda a: _number(a.layer.q_p)),
        ("K+V weights per layer", lambda a: _number(a.layer.k_v)),
        ("FFN weights per layer", lambda a: _number(a.layer.ffn)),
        *_when(exact, ("norm weights per layer", lambda a: _number(a.layer.norms))),
        ("input+output embeddings", lambda a: _number(a.embeddings)),
        *_when(exact, ("final norm", lambda a: _number(a.final_norm))),
        ("total weights", lambda a: (_number if exact else _billions)(a.total_weights)),
        *_when(
            any(a.is_quantized for a in analyses),
            ("weights", lambda a: a.weight_bytes.scheme),
        ),
    ]
    title = f"Model configuration ({_accounting_line(exact)})"
    return title + "\n\n" + _table("parameter", analyses, rows) + _layout_notes(analyses)


def format_savings_table(analyses: Sequence[Analysis]) -> str:
    """The paper's savings table: layer-0 reads per batch and the change in stored weights."""
    exact = _is_exact(analyses)
    batches = analyses[0].batches
    # Tied parallel models keep the plain embedding for the LM head (exact accounting only).
    keeps = [a for a in analyses if a.memory.increase == a.row_width * a.dims.vocab_size]
    formula = "" if keeps else f" (row_width {MINUS} d)\u00b7vocab"
    rows = [
        *_when(exact, ("row_width, d + q_dim + 2e", lambda a: _number(a.row_width))),
        ("weights eliminated", lambda a: _number(a.eliminated_weights)),
        (f"reads without precompute, batch {batches[0]:,}", lambda a: _number(a.reads[0].without)),
        (f"reads with precompute, batch {batches[0]:,}", lambda a: _number(a.reads[0].with_)),
        *[
            (
                f"first-layer reduction, batch {b:,}" if i == 0 else f"batch {b:,}",
                lambda a, i=i: _reduction(a.reads[i].reduction, exact),
            )
            for i, b in enumerate(batches)
        ],
        (f"embedding memory increase{formula}", lambda a: _number(a.memory.increase)),
        ("decrease from eliminated weights", lambda a: _number(-a.memory.decrease)),
        ("net change", lambda a: _number(a.memory.net)),
        ("relative to total weights", lambda a: _percent(a.memory.relative, 1 if exact else 0)),
    ]
    notes = [
        f"{a.name} is tied and parallel: the table's first d columns hold x + FFN(n2(x)), so the "
        "plain embedding stays for the LM head and the increase is row_width\u00b7vocab."
        for a in keeps
    ]
    if exact and any(a.dims.n_experts > 1 and a.dims.is_parallel for a in analyses):
        notes.append(_MOE_NOTE)
    title = f"First-layer savings ({analyses[0].accounting} accounting)"
    return title + "\n\n" + _table("", analyses, rows) + _notes(notes)


def format_whole_model(analyses: Sequence[Analysis]) -> str:
    """Weights read per decode step, FLOPs per token, the two ceilings and a verdict per model."""
    exact = _is_exact(analyses)
    batches = analyses[0].batches
    rows: list[tuple[str, Any]] = []
    for b in batches:
        rows += [
            (f"weights read per step, batch {b:,}: without", _per_step(b, precomputed=False)),
            ("with precompute", _per_step(b, precomputed=True)),
        ]
    for i, b in enumerate(batches):
        label = f"decode ceiling, batch {b:,}" if i == 0 else f"batch {b:,}"
        rows.append((label, lambda a, b=b: f"{a.decode_ceiling(b):.4f}x"))
    rows += [
        ("FLOPs per token: without", lambda a: _number(a.flops_per_token(False))),
        ("with precompute", lambda a: _number(a.flops_per_token(True))),
        ("prefill ceiling, every batch", lambda a: f"{a.prefill_ceiling(1):.4f}x"),
        ("one layer's share, 1/n_layers", lambda a: _percent(a.max_saving, 2)),
    ]
    notes = [
        "Each decode step reads every weight once: all layers, the final norm, the LM head and "
        "B embedding (or table) rows. FLOPs are 2 x weights multiplied per token, the same at "
        "every batch. Attention-score FLOPs and KV-cache reads are left out (precompute does not "
        "change them), so both ceilings are upper bounds.",
    ]
    if exact and any(a.dims.n_experts > 1 for a in analyses):
        notes.append(_MOE_NOTE)
    if any(a.is_quantized for a in analyses):
        notes.append(
            "A quantized checkpoint's decode ceiling counts bytes, its Linears as stored (see "
            "the bytes below): its layers need not be stored alike."
        )
    verdicts = "\n".join(verdict(a) for a in analyses)
    title = f"Whole model, per decode step ({analyses[0].accounting} accounting)"
    return f"{title}\n\n{_table('', analyses, rows)}\n\n{verdicts}{_notes(notes)}"


def verdict(a: Analysis) -> str:
    """One line in numbers: what the trick saves this model, and why that much."""
    first, last = a.batches[0], a.batches[-1]
    save = 1 - 1 / a.decode_ceiling(first)
    later = f" ({_percent(1 - 1 / a.decode_ceiling(last), 2)} at batch {last:,})"
    depth = "deep" if a.dims.n_layers >= 16 else "shallow"
    what = "layer 0's FFN goes too" if a.dims.is_parallel else "only layer 0's Q, K, V go"
    gain = "little to gain" if save < 0.01 else "a modest gain" if save < 0.05 else "worth having"
    return (
        f"{a.name}: saves {_percent(save, 2)} of decode reads at batch {first:,}"
        f"{later if last != first else ''} and {_percent(1 - 1 / a.prefill_ceiling(1), 2)} of "
        f"prefill FLOPs, of at most 1/{a.dims.n_layers} = {_percent(a.max_saving, 1)}: "
        f"a {depth} {a.dims.architecture} model ({what}), {gain}"
    )


_MOE_NOTE = (
    "MoE, exact accounting: a batch of B tokens reads n(1 - (1 - k/n)^B) distinct experts per "
    "layer, the expectation under uniform routing; FLOPs use the k experts each token takes."
)


def _per_step(batch: int, precomputed: bool) -> Any:
    return lambda a: _number(a.weights_read_per_step(batch, precomputed))


def _when(condition: bool, *rows: tuple[str, Any]) -> tuple[tuple[str, Any], ...]:
    return rows if condition else ()


def _is_exact(analyses: Sequence[Analysis]) -> bool:
    if not analyses:
        raise FirstLayerError("no model to analyze: name at least one SOURCE")
    kinds = {a.accounting for a in analyses}
    assert len(kinds) == 1, "one table, one accounting"
    return kinds == {"exact"}


def _accounting_line(exact: bool) -> str:
    if exact:
        return "exact accounting: every parameter of the Hugging Face model"
    return "paper accounting: weight matrices only, every MoE expert counted"


def _experts(m: ModelDims, exact: bool) -> str:
    top_k = f", top-{m.experts_per_token}" if exact and m.n_experts > 1 else ""
    return f"{m.n_experts}{top_k}"


def _biases(m: ModelDims) -> str:
    lay = m.extras
    flags = {
        "QKV": lay.qkv_bias,
        "out": lay.o_bias,
        "MLP": lay.mlp_bias,
        "LM head": lay.lm_head_bias,
    }
    return ", ".join(name for name, has in flags.items() if has) or "none"


def _layout_notes(analyses: Sequence[Analysis]) -> str:
    unknown = [a for a in analyses if not a.dims.extras.is_known]
    return _notes(
        [
            f"{a.name}: firstlayer does not know the {a.dims.model_type} layout and counts it as a "
            "Llama-style layer, so treat its exact figures as estimates."
            for a in unknown
        ]
    )


def _notes(lines: Sequence[str]) -> str:
    return "".join(f"\n\nNote: {line}" for line in lines)


def _table(corner: str, analyses: Sequence[Analysis], rows: Sequence[tuple[str, Any]]) -> str:
    """A Markdown table, padded so it also reads as plain text: one column per model."""
    grid = [[corner, *(a.name for a in analyses)]]
    grid += [[label, *(str(cell(a)) for a in analyses)] for label, cell in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]

    def line(cells: Sequence[str]) -> str:
        numbers = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        padded = [cells[0].ljust(widths[0]), *numbers]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(grid[0]), rule, *(line(r) for r in grid[1:])])


def _number(n: int) -> str:
    return f"{MINUS}{-n:,}" if n < 0 else f"{n:,}"


def _billions(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n:,}"


def _reduction(r: float, exact: bool) -> str:
    # The paper rounds every reduction to a whole number (2.8 -> "3x"); exact keeps 3 digits.
    if not exact or r >= 100:
        return f"{r:,.0f}x"
    return f"{r:.3g}x"


def _percent(x: float, digits: int) -> str:
    text = f"{abs(x) * 100:.{digits}f}%"
    return f"{MINUS}{text}" if x < 0 and text.strip("0.%") else text


def format_placements(analyses: Sequence[Analysis]) -> str:
    """Per table dtype: bytes added on the accelerator and on the host, for both placements."""
    rows = []
    for i, name in enumerate(TABLE_DTYPE_BYTES):
        rows += [
            (f"{name} table: accelerator (table on it)", lambda a, i=i: _cell(a, i, "on_device")),
            ("  table in host memory: accelerator", lambda a, i=i: _cell(a, i, "on_host", 0)),
            ("  table in host memory: host", lambda a, i=i: _cell(a, i, "on_host", 1)),
        ]
    stored = ", a quantized checkpoint's as stored" if any(a.is_quantized for a in analyses) else ""
    title = (
        f"Memory change by table dtype (bytes; other weights in {8 * MODEL_DTYPE_BYTES}-bit"
        f"{stored}, int8 with float32 scales per row and projection)"
    )
    note = (
        "\n\nA table in host memory leaves the accelerator lighter by the eliminated weights: a "
        "decode step copies only its B rows over. On a CPU the loaded table is memory-mapped: "
        "the host figure is disk, and only the rows read become resident."
    )
    return title + "\n\n" + _table("", analyses, rows) + note


def _cell(analysis: Analysis, index: int, where: str, side: int = 0) -> str:
    return _number(getattr(placements(analysis)[index], where)[side])


def format_weight_bytes(analyses: Sequence[Analysis]) -> str:
    """Bytes a decode step reads and the checkpoint stores, quantized Linears as stored, with
    the table in the model's dtype and in int8."""
    batches = analyses[0].batches
    tables = (("in the model's dtype", _model_dtype), ("in int8", lambda a: "int8"))
    rows: list[tuple[str, Any]] = [
        ("model dtype", lambda a: a.weight_bytes.model_dtype),
        ("layer-0 weights eliminated, as stored", lambda a: _number(a.weight_bytes.freed)),
    ]
    for b in batches:
        rows.append((f"bytes read per step, batch {b:,}: without", _bytes_read(b)))
        rows += [(f"with a table {label}", _bytes_read(b, table)) for label, table in tables]
    rows.append(("stored bytes: checkpoint", lambda a: _number(a.weight_bytes.stored)))
    rows += [(f"converted, table {label}", _stored(table)) for label, table in tables]
    title = f"Weights as stored, in bytes ({analyses[0].accounting} accounting)"
    note = (
        "Quantized Linears at their scheme's size (values, scales, zero points), matched on "
        "Llama's module names (model.layers.N.self_attn.q_proj, mlp.gate_proj, "
        "mlp.experts.E.up_proj, lm_head); everything else in the model's dtype. A table row "
        "replaces layer 0's Q, K and V as stored: the fewer bytes they take (int4), the less a "
        "row saves, and at a large batch the rows can cost more than they save."
    )
    return title + "\n\n" + _table("", analyses, rows) + _notes([note])


def _model_dtype(a: Analysis) -> str:
    return a.weight_bytes.model_dtype


def _placement(a: Analysis, table_dtype: str) -> Placement:
    return next(p for p in placements(a) if p.table_dtype == table_dtype)


def _bytes_read(batch: int, table: Callable[[Analysis], str] | None = None) -> Any:
    def cell(a: Analysis) -> str:
        without = a.bytes_read_per_step(batch, False)
        if table is None:
            return _number(without)
        p = _placement(a, table(a))
        return _with_change(p.reads_per_step[a.batches.index(batch)], without)

    return cell


def _stored(table: Callable[[Analysis], str]) -> Any:
    return lambda a: _with_change(_placement(a, table(a)).stored, a.weight_bytes.stored)


def _with_change(after: int, before: int) -> str:
    sign = MINUS if after < before else "+" if after > before else ""
    return f"{_number(after)} ({sign}{_percent(abs(after / before - 1), 2)})"


# --- firstlayer families ---------------------------------------------------------------------


def families_markdown() -> str:
    """The README's family table, a row per declaration, then the refused families."""
    lines = ["| family (`model_type`) | status | blocks | notes |", "|---|---|---|---|"]
    for row in family_rows():
        types = ", ".join(row.model_types)
        lines.append(f"| {types} | {row.status} | {row.blocks} | {row.notes} |")
    return "\n".join(lines) + "\n"


def families_text() -> str:
    """One line a model type, grouped by status."""
    lines = []
    listed = listed_families().values()
    for status in STATUSES:
        entries = [d for d in listed if d["status"] == status]
        lines.append(f"{status} ({len(entries)}):")
        for d in entries:
            blocks = f"{d['blocks']:<28} " if status == SUPPORTED else ""
            lines.append(f"  {d['model_type']:<20} {blocks}{d['notes']}")
    return "\n".join(lines) + "\n"


# --- firstlayer convert, verify, bench -------------------------------------------------------


def describe_folder(record: dict) -> str:
    """A converted folder's record in one line."""
    table = record["table"]
    kept = record.get("kept_layer0")
    eliminated = len(record["eliminated"]) - len(kept["modules"] if kept else ())
    line = (
        f"{record['model_type']} ({record['architecture']}), table {table['width']:,} columns "
        f"in {table['dtype']}, {eliminated} layer-0 modules eliminated"
    )
    if kept:
        line += (
            f", layer 0's q/k/v kept for embedding inputs ({kept['parameters']:,} parameters, "
            f"{kept['bytes'] / 1e6:.2f} MB)"
        )
    return line


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
            f"   (bound {report.FLOAT32_LOGIT_TOLERANCE:.0e})"
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
                else f" (bound on the mean: {report.REDUCED_PRECISION_LOGIT_FACTOR}x this)"
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
            f"{_speedup(timing.ratio):>25}  {getattr(r, f'{phase}_ceiling'):>6.4f}x  "
            f"{_share(getattr(r, f'{phase}_captured')):>8}"
        )
        if tokens_per_s:
            tps = r.tokens_per_s()
            row += f"  {tps['original']:>10.1f}  {tps['precomputed']:>9.1f}"
        rows.append(row)
    return rows


def _speedup(ratio) -> str:
    """1.0123x [1.0010-1.0300]; the interval's confidence when too few pairs reach 95%."""
    text = f"{ratio.median:.4f}x [{ratio.low:.4f}-{ratio.high:.4f}]"
    return text if ratio.confidence >= 0.95 else f"{text} {100 * ratio.confidence:.0f}%"


def _spread(spread) -> str:
    return f"{spread.median:.2f} [{spread.low:.2f}-{spread.high:.2f}]"


def _share(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.0f}%"


def format_engine_bench(result) -> str:
    """An engine's decode speed-up per batch next to its ceiling, and its and the transformers
    loop's tokens/s."""
    engine_name = result.engine.split()[0]
    head = (
        f"{result.model} in {result.engine}, {result.dtype}, "
        f"{'compiled' if result.compiled else 'eager'}; prompt {result.prompt_tokens} tokens, "
        f"{result.new_tokens} new tokens, {result.repeats} alternating pairs after a warm-up; "
        f"decode step from {result.timing}; times: medians [min-max]; "
        "speed-up: median of the per-pair ratios [its 95% interval]"
    )
    header = (
        f"{'batch':>5}  {'decode ms/step: original':>26}  {'precomputed':>21}  "
        f"{'speedup [interval]':>25}  {'ceiling':>7}  {'captured':>8}  "
        f"{engine_name + ' tok/s orig':>15}  {'pre':>7}  "
        f"{'transformers tok/s orig':>23}  {'pre':>7}"
    )
    rows = [header]
    for r in result.results:
        timing, engine, loop = r.decode_ms, r.tokens_per_s(), r.transformers_tokens_per_s
        rows.append(
            f"{r.batch:>5}  {_spread(timing.original):>26}  {_spread(timing.precomputed):>21}  "
            f"{_speedup(timing.ratio):>25}  {r.decode_ceiling:>6.4f}x  "
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
    reference = next(iter(result.table_bytes))  # the variants in order, the reference first
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
