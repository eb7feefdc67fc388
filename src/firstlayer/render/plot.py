"""Pictures of the results: matplotlib (Agg, no display), imported only when a plot is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from firstlayer.errors import FirstLayerError

if TYPE_CHECKING:
    from firstlayer.analysis.savings import Analysis
    from firstlayer.tools.bench import BenchResult

FORMATS = (".png", ".svg", ".pdf")


def plot_analysis(analyses: Sequence[Analysis], path: str | Path) -> Path:
    """Draw layer-0 read reduction and whole-model decode ceiling against batch, a line a model."""
    path = _checked_path(path)
    import matplotlib

    matplotlib.use("Agg")  # no display; harmless when a backend is already chosen
    import matplotlib.pyplot as plt

    top = max(1024, *(max(a.batches) for a in analyses))
    batches = [2**i for i in range(top.bit_length())]  # 1, 2, 4, ... up to the largest asked for
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for i, a in enumerate(analyses):
        # Models with the same layer 0 draw the same line: vary the style so none hides another.
        style = dict(marker="osD^v"[i % 5], markersize=4, ls=("-", "--", "-.", ":")[i // 5 % 4])
        label = f"{a.name} ({a.dims.architecture}, {a.dims.n_layers} layers)"
        reductions = [a.layer0_reads(b, False) / a.layer0_reads(b, True) for b in batches]
        (line,) = left.plot(batches, reductions, label=label, **style)
        ceilings = [a.decode_ceiling(b) for b in batches]
        right.plot(batches, ceilings, color=line.get_color(), label=label, **style)
        # Dotted: the ceiling if one whole layer of n_layers vanished, the paper's bound.
        bound = 1 / (1 - a.max_saving)
        right.axhline(
            bound,
            color=line.get_color(),
            ls=":",
            lw=1,
            label="bound: one layer of n_layers" if i == 0 else None,
        )
    axis = "batch size B (tokens per decode step)"
    left.set(
        xscale="log",
        yscale="log",
        xlabel=axis,
        ylabel="layer-0 reads, without / with precompute",
        title="First layer: reduction in values read",
    )
    right.set(
        xscale="log",
        xlabel=axis,
        ylabel="weights read per step, without / with",
        title="Whole model: decode speed-up ceiling",
    )
    for ax in (left, right):
        ax.axhline(1, color="grey", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    accounting = analyses[0].accounting
    fig.suptitle(f"Precomputing the first layer (arXiv 2402.13388), {accounting} accounting")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bench(result: BenchResult, path: str | Path) -> Path:
    """Measured decode and prefill speed-up against batch, next to the analyser's ceilings."""
    path = _checked_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r.batch for r in result.results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for ax, phase in zip(axes, ("decode", "prefill"), strict=True):
        pairs = [getattr(r, f"{phase}_ms") for r in result.results]
        speedups = [p.speedup for p in pairs]
        # The interval of the median per-pair ratio.
        low = [s - p.ratio.low for s, p in zip(speedups, pairs, strict=True)]
        high = [p.ratio.high - s for s, p in zip(speedups, pairs, strict=True)]
        ax.errorbar(
            batches,
            speedups,
            yerr=[low, high],
            marker="o",
            capsize=3,
            label="measured (median per-pair ratio, its interval)",
        )
        ceilings = [getattr(r, f"{phase}_ceiling") for r in result.results]
        bound = "bytes-bound" if phase == "decode" else "FLOPs-bound"
        ax.plot(batches, ceilings, marker="s", ls="--", label=f"ceiling ({bound}, analyser)")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set(
            xscale="log",
            xlabel="batch size B",
            ylabel="original time / precomputed time",
            title=f"{phase.capitalize()} speed-up",
        )
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    how = "torch.compile" if result.compiled else "eager"
    fig.suptitle(
        f"{result.model}: precomputed first layer, {result.dtype} on {result.device} "
        f"({result.threads} threads, {how}, static KV cache)"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise FirstLayerError(f"{path}: cannot tell the picture format: end the name in .png")
    if not path.parent.is_dir():
        raise FirstLayerError(f"{path}: folder {path.parent} does not exist: create it first")
    return path
