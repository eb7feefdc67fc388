"""The benchmark harness: alternation, warm-up, ceilings and output. No test asserts a time."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone

from firstlayer.analysis.savings import analyze
from firstlayer.cli import main
from firstlayer.conversion import precompute
from firstlayer.tools.bench import (
    DecodeLoop,
    Spread,
    bench,
    captured,
    median_interval,
    pair_of,
    time_pair,
    toy_width,
)

WARM_UP_SECONDS = 0.3


class RecordingLoop(DecodeLoop):
    """A real decode loop that logs its runs; its first run (the warm-up) is made slow."""

    def __init__(self, name: str, log: list[str], *args):
        super().__init__(*args)
        self.name, self.log = name, log

    def run(self, prompt, new_tokens):
        prefill, steps = super().run(prompt, new_tokens)
        if not any(entry == self.name for entry in self.log):
            time.sleep(WARM_UP_SECONDS)
            prefill, steps = prefill + WARM_UP_SECONDS, [s + WARM_UP_SECONDS for s in steps]
        self.log.append(self.name)
        return prefill, steps


def loops_for(family_id: str, log: list[str]) -> dict[str, DecodeLoop]:
    model = build_tiny(next(f for f in FAMILIES if f.id == family_id))
    twin = precompute(clone(model))
    return {
        "original": RecordingLoop("original", log, model, 12, False),
        "precomputed": RecordingLoop("precomputed", log, twin, 12, False),
    }


def test_runs_alternate_after_one_warm_up_each():
    log: list[str] = []
    prompt = torch.randint(0, 200, (2, 4))
    time_pair(loops_for("llama", log), prompt, new_tokens=3, repeats=4)
    assert log[:2] == ["original", "precomputed"]  # warm-up
    timed = log[2:]
    assert timed == ["original", "precomputed", "precomputed", "original"] * 2
    assert timed.count("original") == timed.count("precomputed") == 4


def test_warm_up_is_not_counted():
    log: list[str] = []
    decode, prefill = time_pair(loops_for("gpt_neox", log), torch.randint(0, 200, (1, 4)), 3, 3)
    for pair in (decode, prefill):
        for spread in (pair.original, pair.precomputed):
            assert spread.high < 1e3 * WARM_UP_SECONDS  # ms: the slow first run is left out


def test_decode_loop_generates_what_generate_does():
    model = build_tiny(next(f for f in FAMILIES if f.id == "qwen3"))
    prompt = torch.randint(3, 200, (2, 5))
    expected = model.generate(
        prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )[:, 5:]
    for candidate in (model, precompute(clone(model))):
        loop = DecodeLoop(candidate, 5 + 6, compile=False)
        loop.run(prompt, 6)
        assert torch.equal(loop.tokens, expected)


def test_ceilings_come_from_the_exact_analysis():
    model = build_tiny(next(f for f in FAMILIES if f.id == "phi"))
    result = bench(model, "phi", batches=(1, 3), new_tokens=2, prompt_tokens=3, repeats=1)
    analysis = analyze(model.config.to_dict(), accounting="exact")
    for r in result.results:
        assert r.decode_ceiling == analysis.decode_ceiling(r.batch)
        assert r.prefill_ceiling == analysis.prefill_ceiling(r.batch, prompt_tokens=3)
        assert r.bytes_per_step["original"] == 4 * analysis.weights_read_per_step(r.batch, False)
        assert r.bytes_per_step["precomputed"] == 4 * analysis.weights_read_per_step(r.batch, True)
    assert result.memory_bytes["precomputed"] != result.memory_bytes["original"]
    assert result.bandwidth > 0 and result.overhead_ms > 0


def test_captured_share_and_spread():
    assert abs(captured(1.06, 1.12) - 0.5) < 1e-12
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)


def test_toy_width_keeps_depth_and_heads():
    config = {
        "model_type": "gptj",
        "n_embd": 4096,
        "n_layer": 28,
        "n_head": 16,
        "rotary_dim": 64,
        "vocab_size": 50400,
    }
    toy = toy_width(config)
    assert toy["n_layer"] == 28 and toy["n_head"] == 16
    assert toy["n_embd"] == 128 and toy["rotary_dim"] < toy["n_embd"] // toy["n_head"]


def test_bench_cli_on_a_bare_config_end_to_end(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                "vocab_size": 256,
            }
        )
    )
    plot = tmp_path / "bench.png"
    argv = [
        "bench",
        str(config),
        "--batch",
        "1",
        "2",
        "--new-tokens",
        "3",
        "--prompt-tokens",
        "4",
        "--repeats",
        "2",
        "--json",
        "--plot",
        str(plot),
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        assert set(r["decode_tokens_per_s"]) == {"original", "precomputed"}
        for key in (
            "decode_speedup",
            "decode_ceiling",
            "prefill_speedup",
            "prefill_ceiling",
            "decode_captured",
            "roofline",
        ):
            assert key in r
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv[:-3]) == 0  # the text report
    text = capsys.readouterr().out
    assert "captured" in text and "framework overhead" in text and "GB/s" in text


def test_median_interval_is_order_statistics_with_their_coverage():
    low, high, confidence = median_interval(list(range(10, 0, -1)))
    # n = 10: the 2nd smallest and 2nd largest cover the median with 1 - 2 (1 + 10) / 2^10.
    assert (low, high) == (2, 9)
    assert confidence == pytest.approx(1 - 2 * 11 / 1024)
    assert confidence >= 0.95
    # Too few values for 95%: min-max, with the confidence it has.
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)


def test_speedup_is_the_median_of_per_pair_ratios():
    # A neighbour's load slows the second pair's runs alike; its ratio is unaffected.
    pair = pair_of({"original": [10.0, 40.0, 30.0], "precomputed": [5.0, 20.0, 30.0]})
    assert pair.speedup == 2.0  # ratios 2, 2, 1; the ratio of the medians would say 1.5
    assert (pair.ratio.low, pair.ratio.high, pair.ratio.pairs) == (1.0, 2.0, 3)


def test_every_batch_is_labelled_with_the_model_it_times():
    """Each batch's progress and the result name the model benched, whatever batch it is."""
    labels = []
    result = bench(
        build_tiny(FAMILIES[0]),
        name="tiny llama",
        batches=(1, 2),
        new_tokens=2,
        prompt_tokens=2,
        repeats=1,
        progress=lambda label, done, total: labels.append(label),
    )
    assert set(labels) == {"tiny llama: batch 1", "tiny llama: batch 2"}, labels
    assert result.model == "tiny llama"
    assert set(result.memory_bytes) == {"original", "precomputed"}
