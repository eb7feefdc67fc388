"""The demo: convert the default model, verify it, and ask both models the same chat question."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from firstlayer.analysis.savings import analyze
from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import is_precomputed_folder
from firstlayer.hf.loading import load, load_source
from firstlayer.tools.generation import generate_text
from firstlayer.tools.verify import VerifyReport, verify

QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class DemoResult:
    source: str
    out: Path
    report: VerifyReport
    predicted_change: int
    question: str
    original_answer: str
    precomputed_answer: str


def demonstrate(
    out: Path,
    max_new_tokens: int = 48,
    question: str = QUESTION,
    progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Convert `default` into `out` (replacing an earlier demo there), verify, and chat."""
    if out.exists() and not is_precomputed_folder(out):
        raise FirstLayerError(
            f"{out} exists and is not an earlier demo's output: pass --out with a new folder"
        )
    original = load_source("default")
    convert(original.model, out, original.tokenizer, force=True, progress=progress)
    precomputed = load(out)
    report = verify(original.model, precomputed, original.tokenizer)
    predicted = analyze(original.model.config.to_dict(), accounting="exact").memory.net

    def answer(model) -> str:
        return generate_text(model, original.tokenizer, question, max_new_tokens, chat=True)

    return DemoResult(
        source=original.source.name,
        out=out,
        report=report,
        predicted_change=predicted,
        question=question,
        original_answer=answer(original.model),
        precomputed_answer=answer(precomputed),
    )
