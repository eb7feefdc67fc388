"""`firstlayer analyze`: the paper's tables to the digit, JSON, plots, errors, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from firstlayer.cli import main

# The two tables of arXiv 2402.13388 as PAPER.md carries them (its minus signs are U+2212).
PAPER_CONFIG = """
| parameter | Pythia-6.9B | Mistral-7B | Mixtral-8x7B |
|---|---|---|---|
| parallel attention/FFN | parallel | serial | serial |
| attention | MHA | GQA | GQA |
| d, n_layers | 4,096, 32 | 4,096, 32 | 4,096, 32 |
| n_heads, n_kv_heads | 32, 32 | 32, 8 | 32, 8 |
| e | 4,096 | 1,024 | 1,024 |
| FFN type, hidden | 2-layer MLP, 16,384 | SwiGLU, 14,336 | SwiGLU MoE, 14,336 |
| experts | 1 | 1 | 8 |
| vocab_size | 50,400 | 32,000 | 32,000 |
| Q+P weights per layer | 33,554,432 | 33,554,432 | 33,554,432 |
| K+V weights per layer | 33,554,432 | 8,388,608 | 8,388,608 |
| FFN weights per layer | 134,217,728 | 176,160,768 | 1,409,286,144 |
| input+output embeddings | 412,876,800 | 262,144,000 | 262,144,000 |
| total weights | 6.9B | 7.2B | 46.7B |
"""
PAPER_SAVINGS = """
| | Pythia-6.9B | Mistral-7B | Mixtral-8x7B parallel |
|---|---|---|---|
| weights eliminated | 184,549,376 | 25,165,824 | 1,434,451,968 |
| reads without precompute, batch 1 | 184,553,472 | 25,169,920 | 1,434,456,064 |
| reads with precompute, batch 1 | 16,384 | 10,240 | 10,240 |
| first-layer reduction, batch 1 | 11,264x | 2,458x | 140,084x |
| batch 16 | 704x | 154x | 8,756x |
| batch 256 | 44x | 10x | 548x |
| batch 1,024 | 11x | 3x | 137x |
| embedding memory increase (row_width − d)·vocab | 619,315,200 | 196,608,000 | 196,608,000 |
| decrease from eliminated weights | −184,549,376 | −25,165,824 | −1,434,451,968 |
| net change | 434,765,824 | 171,442,176 | −1,237,843,968 |
| relative to total weights | 6% | 2% | −3% |
"""


def cells(table: str) -> list[list[str]]:
    """A Markdown table's cells, the |---| rule left out."""
    rows = [line for line in table.strip().splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows if not set(r) <= set("|-: ")]


def tables(output: str) -> list[list[list[str]]]:
    blocks = output.split("\n\n")
    return [cells(b) for b in blocks if b.lstrip().startswith("|")]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_paper_reproduces_both_tables_to_the_digit(capsys):
    code, out, _ = run(capsys, "paper")
    assert code == 0
    config, savings = tables(out)[:2]
    assert config == cells(PAPER_CONFIG)
    assert savings == cells(PAPER_SAVINGS)


def test_paper_uses_the_minus_sign_not_a_hyphen(capsys):
    _, out, _ = run(capsys, "paper")
    assert "\u22121,237,843,968" in out and "-1,237,843,968" not in out


def test_several_sources_are_columns(capsys):
    code, out, _ = run(capsys, "mistral-7b", "pythia-6.9b", "--batch", "1", "64")
    assert code == 0
    for table in tables(out):
        assert table[0][1:] == ["Mistral-7B", "Pythia-6.9B"]
    labels = [row[0] for row in tables(out)[1]]
    assert "first-layer reduction, batch 1" in labels and "batch 64" in labels
    assert "Mistral-7B: saves" in out and "Pythia-6.9B: saves" in out


def test_exact_adds_rows_that_explain_the_differences(capsys):
    code, out, _ = run(capsys, "mixtral-8x7b", "--accounting", "exact")
    assert code == 0
    labels = [row[0] for row in tables(out)[0]]
    for label in (
        "q_dim, head_dim",
        "tied embeddings",
        "norms per layer",
        "biases",
        "norm weights per layer",
        "final norm",
    ):
        assert label in labels
    assert "8, top-2" in out
    assert "46,702,792,704" in out  # Mixtral-8x7B's parameter count, router and norms included


JSON_KEYS = {
    "model",
    "architecture",
    "attention",
    "d",
    "q_dim",
    "e",
    "n_layers",
    "vocab_size",
    "row_width",
    "eliminated_weights",
    "total_weights",
    "reads",
    "memory",
    "accounting",
    "whole_model",
}


def test_json_holds_one_object_per_model(capsys):
    code, out, _ = run(capsys, "paper", "--json")
    assert code == 0
    models = json.loads(out)
    assert [m["model"] for m in models] == [
        "Pythia-6.9B",
        "Mistral-7B",
        "Mixtral-8x7B",
        "Mixtral-8x7B parallel",
    ]
    for m in models:
        assert set(m) >= JSON_KEYS
        assert m["accounting"] == "paper"
        assert [r["batch"] for r in m["reads"]] == [1, 16, 256, 1024]
        assert set(m["reads"][0]) == {"batch", "without", "with", "reduction"}
        assert set(m["memory"]) == {"increase", "decrease", "net", "relative"}
        whole = m["whole_model"]
        assert set(whole["reads_per_step"][0]) >= {"batch", "without", "with", "decode_ceiling"}
        assert set(whole["flops_per_token"]) == {"without", "with"}
        assert whole["prefill_ceiling"] > 1
    pythia = models[0]
    assert (pythia["architecture"], pythia["attention"], pythia["row_width"]) == (
        "parallel",
        "MHA",
        16_384,
    )
    assert pythia["eliminated_weights"] == 184_549_376
    assert pythia["memory"]["net"] == 434_765_824


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "analysis.png"
    code, _, err = run(capsys, "mistral-7b", "pythia-6.9b", "--plot", str(path))
    assert code == 0 and str(path) in err
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_refused_family_is_one_line_and_exit_code_2(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    )
    code, out, err = run(capsys, str(config))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith("firstlayer: error: gpt2 adds a learned absolute position embedding")


def test_missing_model_type_is_an_error(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(hidden_size=64)))
    code, _, err = run(capsys, str(config))
    assert code == 2 and "no model_type" in err


def test_paper_takes_no_other_source(capsys):
    code, _, err = run(capsys, "paper", "mistral-7b")
    assert code == 2 and "run it on its own" in err


def test_bad_batch_is_an_error(capsys):
    code, _, err = run(capsys, "mistral-7b", "--batch", "0")
    assert code == 2 and "positive integers" in err


@pytest.mark.slow
def test_default_exact_reads_the_smollm2_gguf(capsys):
    code, out, _ = run(capsys, "default", "--accounting", "exact")
    assert code == 0
    assert "134,515,008" in out  # SmolLM2-135M's parameter count
    assert "a deep serial model" in out


@pytest.mark.slow
def test_analyze_paper_imports_no_torch():
    code = (
        "import sys\n"
        "from firstlayer.cli import main\n"
        "assert main(['analyze', 'paper']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_analyze_quietly():
    """`firstlayer analyze paper | head`: the reader (here one that reads nothing) goes away,
    and the writer stops with nothing on stderr."""
    firstlayer = Path(sys.executable).with_name("firstlayer")
    result = subprocess.run(
        f"'{firstlayer}' analyze paper | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stderr == "", result.stderr
