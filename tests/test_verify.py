"""verify(): the report's figures, and the parameter change the analyser predicts."""

from __future__ import annotations

import torch
from conftest import FAMILIES, build_tiny, clone

from firstlayer import precompute
from firstlayer.analysis.savings import analyze
from firstlayer.conversion import convert
from firstlayer.hf.loading import load
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE, verify, weights_count


def test_measured_parameter_change_equals_exact_analysis(tiny, tmp_path):
    """The weights a conversion adds and removes are what `analyze --accounting exact` says."""
    predicted = analyze(tiny.config.to_dict(), accounting="exact")
    assert weights_count(tiny) == predicted.total_weights
    model = load(convert(clone(tiny), tmp_path / "out"))
    report = verify(tiny, model, max_new_tokens=4)
    assert report.params_before == predicted.total_weights
    assert report.params_after - report.params_before == predicted.memory.net
    assert report.params_before - (report.params_after - predicted.memory.increase) == (
        predicted.memory.decrease
    )
    # What leaves the reads: the memory's decrease, and a serial layer 0's attention norm, which
    # the table module keeps for adapters.
    kept = predicted.eliminated_weights - predicted.memory.decrease
    assert kept == (
        0
        if predicted.dims.is_parallel
        else sum(p.numel() for n, p in model.named_parameters() if ".attn_norm." in n)
    )


def test_report_passes_for_a_faithful_model_and_fails_for_a_wrong_one():
    family = next(f for f in FAMILIES if f.id == "qwen2")
    original = build_tiny(family)
    good = verify(original, precompute(clone(original)), max_new_tokens=8)
    assert good.passed and good.max_logit_diff <= FLOAT32_LOGIT_TOLERANCE
    assert good.token_agreement == 1.0 and good.greedy_agreement == 1.0

    wrong = precompute(clone(original))
    with torch.no_grad():  # one corrupted row: the model is no longer the original
        wrong.get_input_embeddings().qkv[:, 6:] += 0.5
    bad = verify(original, wrong, max_new_tokens=8)
    assert not bad.passed and bad.max_logit_diff > FLOAT32_LOGIT_TOLERANCE
    assert bad.to_dict()["passed"] is False
