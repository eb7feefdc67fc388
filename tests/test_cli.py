"""The subcommands over the library: convert, verify, check, generate, demo (via main(argv))."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILIES, build_tiny

from firstlayer.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    family = next(f for f in FAMILIES if f.id == "gpt_neox")
    folder = tmp_path / "neox"
    build_tiny(family).save_pretrained(folder)
    return folder


def test_convert_verify_check(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_folder), str(out)]) == 0
    assert "gpt_neox (parallel)" in capsys.readouterr().out
    assert main(["verify", str(tiny_folder), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["greedy_equal"]
    assert report["params_after"] - report["params_before"] == report["predicted_param_change"]
    assert report["bytes_on_disk"]["before"] > 0 and report["bytes_on_disk"]["after"] > 0
    assert main(["check", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_verify_text_names_the_figures(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    main(["convert", str(tiny_folder), str(out), "--dtype", "bfloat16"])
    capsys.readouterr()
    assert main(["verify", str(tiny_folder), str(out)]) == 0
    text = capsys.readouterr().out
    for words in (
        "max |logit diff|",
        "mean |logit diff|",
        "token agreement",
        "original in bfloat16",
        "parameters",
        "matches `analyze --accounting exact`",
        "bytes on disk",
        "PASS",
    ):
        assert words in text, words


def test_convert_refuses_a_precomputed_source(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    main(["convert", str(tiny_folder), str(out)])
    assert main(["convert", str(out), str(tmp_path / "again")]) == 2
    assert "precomputed model already" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_streams_the_answer(smollm2_converted, capsys):
    code = main(
        [
            "generate",
            str(smollm2_converted),
            "What is the capital of France?",
            "--chat",
            "--max-new-tokens",
            "12",
        ]
    )
    assert code == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_samples_reproducibly_with_a_seed(smollm2_converted, capsys):
    argv = [
        "generate",
        str(smollm2_converted),
        "Once upon a time",
        "--temperature",
        "0.9",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
    ]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first


@pytest.mark.slow
def test_demo_converts_verifies_and_answers_side_by_side(smollm2, monkeypatch, tmp_path, capsys):
    import firstlayer.tools.demo
    from firstlayer.analysis.sources import resolve_source
    from firstlayer.hf.loading import Loaded

    model, tokenizer = smollm2  # the session's copy, not a second dequantisation

    def loaded(spec: str) -> Loaded:
        return Loaded(model, tokenizer, resolve_source(spec))

    monkeypatch.setattr(firstlayer.tools.demo, "load_source", loaded)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "16"]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "the two answers are identical" in text
    assert text.count("Paris") >= 2


def test_convert_int8_table_out_of_core_then_verify_reports_its_error(
    tiny_folder, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_folder), str(out), "--table-dtype", "int8"]) == 0
    assert "in int8" in capsys.readouterr().out
    assert main(["verify", str(tiny_folder), str(out)]) == 0
    text = capsys.readouterr().out
    for words in (
        "model / table dtype  float32 / int8",
        "table (int8) max",
        "original in bfloat16",
    ):
        assert words in text, words
    assert main(["verify", str(tiny_folder), str(out), "--rows", "64"]) == 0
    assert main(["check", str(out)]) == 0
