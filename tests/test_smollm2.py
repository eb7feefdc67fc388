"""The real SmolLM2-135M-Instruct (Llama architecture, tied embeddings), from its GGUF file."""

from __future__ import annotations

import pytest
import torch

from firstlayer.hf.loading import load
from firstlayer.tools.generation import generate_text
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE, prompt_batch, verify

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def converted(smollm2_converted):
    return load(smollm2_converted)


def test_converted_smollm2_matches_original(smollm2, converted):
    original, tokenizer = smollm2
    report = verify(original, converted, tokenizer, max_new_tokens=32)
    assert report.max_logit_diff <= FLOAT32_LOGIT_TOLERANCE, report
    assert report.greedy_equal and report.greedy_tokens == 32, report
    assert report.token_agreement == 1.0


def test_converted_smollm2_beam_search_matches(smollm2, converted):
    original, tokenizer = smollm2
    batch = prompt_batch(tokenizer, ("The capital of France is", "Once upon a time"), 0)
    settings = dict(
        max_new_tokens=32,
        min_new_tokens=32,
        num_beams=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        assert torch.equal(
            original.generate(**batch, **settings), converted.generate(**batch, **settings)
        )


def test_demo_answer_is_the_original_answer(smollm2, converted):
    original, tokenizer = smollm2
    expected = generate_text(original, tokenizer, QUESTION, max_new_tokens=32, chat=True)
    pieces: list[str] = []
    answer = generate_text(
        converted, tokenizer, QUESTION, max_new_tokens=32, chat=True, on_text=pieces.append
    )
    assert answer == expected
    assert "Paris" in answer
    assert "".join(pieces).strip() == answer.strip()  # streamed as it was produced


def test_converted_folder_is_self_contained(smollm2_converted):
    from transformers import AutoTokenizer

    names = {p.name for p in smollm2_converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(smollm2_converted, local_files_only=True)
    assert tokenizer("Paris")["input_ids"]


def test_tied_lm_head_is_stored_once(converted):
    assert converted.lm_head.weight is converted.get_input_embeddings().residual


def test_a_model_loaded_from_gguf_is_precomputed_saved_and_loaded(smollm2, tmp_path):
    """The README's Python workflow on the default model: transformers refuses to save a model
    loaded through its GGUF "quantizer"; the precomputed one holds plain tensors and saves."""
    import copy
    import json

    import firstlayer

    original, tokenizer = smollm2
    precomputed = firstlayer.precompute(copy.deepcopy(original))
    out = firstlayer.save(precomputed, tmp_path / "out", tokenizer=tokenizer)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert original.hf_quantizer is not None  # the source is left as it was
    reloaded = firstlayer.load(out)
    batch = prompt_batch(tokenizer, (QUESTION, "Hi"), original.config.vocab_size)
    with torch.inference_mode():
        expected = original(**batch).logits
        assert (reloaded(**batch).logits - expected).abs().max() <= FLOAT32_LOGIT_TOLERANCE
