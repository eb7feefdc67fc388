"""Embedding inputs (inputs_embeds: soft prompts, prompt tuning) on a model converted with layer
0 kept: positions fed by an embedding run layer 0's own norm and q/k/v, token positions read the
table; without the option the model refuses inputs_embeds, naming it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone
from safetensors import safe_open

from firstlayer import precompute
from firstlayer.cli import main
from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError

SOFT_TOKENS = 4
NEW_TOKENS = 8
# A tied LM head, q/k norms at run time, an embedding scale, a fused qkv_proj, no attention
# norm, an embedding multiplier, an embedding norm, q/k/v biases.
SERIAL = ("llama", "qwen3", "gemma3_text", "phi3", "olmo2", "granite", "bloom", "qwen2")


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


def soft_prompt_call(model, seed: int = 0) -> torch.Tensor:
    """Soft prompt vectors followed by token embeddings, (2, SOFT_TOKENS + 9, D)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=generator)
    soft = torch.randn(2, SOFT_TOKENS, model.config.hidden_size, generator=generator)
    return torch.cat([soft, model.get_input_embeddings()(ids)], dim=1)


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert (expected - actual).abs().max().item() <= 1e-5 * max(scale, 1.0)


@pytest.fixture(scope="module")
def llama_pair():
    original = build_tiny(family("llama"))
    return original, precompute(clone(original), keep_layer0=True)


@pytest.mark.parametrize("family_id", SERIAL)
def test_soft_prompts_give_the_original_logits_and_tokens(family_id):
    original = build_tiny(family(family_id))
    model = precompute(clone(original), keep_layer0=True)
    with torch.inference_mode():
        embeds = soft_prompt_call(original)
        assert_close(original(inputs_embeds=embeds).logits, model(inputs_embeds=embeds).logits)
        common = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected = original.generate(inputs_embeds=embeds, **common)
        assert torch.equal(expected, model.generate(inputs_embeds=embeds, **common))
        beams = dict(common, num_beams=3)
        expected = original.generate(inputs_embeds=embeds, **beams)
        assert torch.equal(expected, model.generate(inputs_embeds=embeds, **beams))


def test_without_the_option_inputs_embeds_are_refused_naming_it():
    model = precompute(build_tiny(family("llama")))
    embeds = torch.zeros(1, 3, model.config.hidden_size)
    with pytest.raises(FirstLayerError, match="not inputs_embeds.*--keep-layer0.*keep_layer0"):
        model(inputs_embeds=embeds)
    with pytest.raises(FirstLayerError, match="--keep-layer0"):
        model.generate(inputs_embeds=embeds, max_new_tokens=2)


def test_a_parallel_block_refuses_the_option_by_name():
    with pytest.raises(FirstLayerError, match="gpt_neox model: its layer 0 is a parallel block"):
        precompute(build_tiny(family("gpt_neox")), keep_layer0=True)


def test_decode_steps_run_no_kept_projection(llama_pair):
    """Only the prefill, whose positions are fed by embeddings, runs layer 0's kept norm (and
    with it the q/k/v projections); each decode step reads the table for its new token."""
    original, model = llama_pair
    calls = []
    norm = model.get_input_embeddings().attn_norm
    handle = norm.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        with torch.inference_mode():
            embeds = soft_prompt_call(original, seed=3)
            tokens = model.generate(
                inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False
            )
            model(input_ids=tokens)  # token ids only: no kept projection either
    finally:
        handle.remove()
    assert tokens.shape[1] == NEW_TOKENS
    assert calls == [embeds.shape]


def test_peft_prompt_tuning_and_p_tuning_match_the_original(llama_pair):
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    original, model = llama_pair
    ids = torch.randint(3, original.config.vocab_size, (2, 7), generator=torch.manual_seed(4))
    for config in (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32),
    ):
        tuned_original = get_peft_model(clone(original), config)
        tuned = get_peft_model(clone(model), config)
        tuned.prompt_encoder.load_state_dict(tuned_original.prompt_encoder.state_dict())
        with torch.inference_mode():
            expected = tuned_original(input_ids=ids).logits
            assert_close(expected, tuned(input_ids=ids).logits)
            common = dict(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(tuned_original.generate(**common), tuned.generate(**common))


def test_a_converted_folder_keeps_the_weights_under_their_names_and_loads(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    original, _ = llama_pair
    out = convert(clone(original), tmp_path / "out", keep_layer0=True)
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    kept = record["kept_layer0"]
    projections = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert kept["modules"] == projections
    count = sum(original.get_submodule(m).weight.numel() for m in projections)
    assert (kept["parameters"], kept["bytes"]) == (count, 4 * count)
    with safe_open(out / "model.safetensors", "pt") as stored:
        for module in projections:
            weight = original.get_submodule(module).weight
            assert torch.equal(stored.get_tensor(f"{module}.weight"), weight)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        embeds = soft_prompt_call(original, seed=5)
        assert_close(original(inputs_embeds=embeds).logits, loaded(inputs_embeds=embeds).logits)
    # Its own state dict loads back as any model's; the original's computes the table again.
    loaded.load_state_dict(loaded.state_dict())
    other = build_tiny(family("llama"), seed=1)
    loaded.load_state_dict(other.state_dict(), strict=False)
    with torch.inference_mode():
        assert_close(other(inputs_embeds=embeds).logits, loaded(inputs_embeds=embeds).logits)
        ids = torch.randint(3, 256, (1, 6), generator=torch.manual_seed(6))
        assert_close(other(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_the_cli_option_prints_what_the_kept_weights_cost(tmp_path, capsys):
    source = tmp_path / "llama"
    build_tiny(family("llama")).save_pretrained(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--keep-layer0"]) == 0
    printed = capsys.readouterr().out
    assert "q/k/v kept for embedding inputs (8,192 parameters, 0.03 MB)" in printed
    assert main(["verify", str(source), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
