"""Adapters (PEFT's LoRA) on a precomputed model: the original's answer with the same adapter,
or a refusal by name of what the table replaced and cannot take an adapter exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch, with_head_norms_folded

from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import record_weight_files
from firstlayer.hf.loading import load, save
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE

FAMILY = {f.id: f for f in FAMILIES}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model, path, targets, seed=0, **settings):
    """A LoRA adapter as PEFT saves it, with random B (PEFT starts B at zero: no effect)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(target_modules=targets, init_lora_weights=False, **settings)
    get_peft_model(clone(model), config).save_pretrained(path)
    return path


def logits(model, batch, **kwargs):
    with torch.inference_mode():
        return model(**batch, **kwargs).logits


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama, its folder, and adapters A (rank 8, q/k/v/o and the MLP of every layer)
    and B (rank 16, q and v)."""
    root = tmp_path_factory.mktemp("adapters")
    model = build_tiny(FAMILY["llama"])
    return {
        "model": model,
        "folder": convert(model, root / "precomputed"),
        "A": save_adapter(model, root / "A", LLAMA_TARGETS, r=8, seed=1),
        "B": save_adapter(model, root / "B", ["q_proj", "v_proj"], r=16, seed=2),
        "root": root,
    }


def test_peft_from_pretrained_gives_the_originals_logits_and_tokens(llama):
    from peft import PeftModel

    batch = left_padded_batch(llama["model"].config.vocab_size)
    original = PeftModel.from_pretrained(clone(llama["model"]), llama["A"])
    precomputed = PeftModel.from_pretrained(load(llama["folder"]), llama["A"])
    mask = batch["attention_mask"]
    expected = logits(original, batch)
    assert max_diff(expected, logits(llama["model"], batch), mask) > 0.1  # the adapter acts
    assert max_diff(logits(precomputed, batch), expected, mask) <= FLOAT32_LOGIT_TOLERANCE
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for beams in (1, 4):
        a = original.generate(**batch, num_beams=beams, **settings)
        b = precomputed.generate(**batch, num_beams=beams, **settings)
        assert torch.equal(a, b), beams


def test_several_adapters_switched_mixed_in_a_batch_or_disabled(llama):
    from peft import PeftModel

    batch = left_padded_batch(llama["model"].config.vocab_size)
    mask = batch["attention_mask"]
    models = [
        PeftModel.from_pretrained(m, llama["A"])
        for m in (clone(llama["model"]), load(llama["folder"]))
    ]
    for model in models:
        model.load_adapter(llama["B"], adapter_name="B")
    mixed = ["default", "B", "__base__", "default", "B", "__base__"]
    original, precomputed = models
    assert (
        max_diff(
            logits(precomputed, batch, adapter_names=mixed),
            logits(original, batch, adapter_names=mixed),
            mask,
        )
        <= FLOAT32_LOGIT_TOLERANCE
    )
    for model in models:
        model.set_adapter("B")
    assert (
        max_diff(logits(precomputed, batch), logits(original, batch), mask)
        <= FLOAT32_LOGIT_TOLERANCE
    )
    with original.disable_adapter(), precomputed.disable_adapter():
        assert (
            max_diff(logits(precomputed, batch), logits(llama["model"], batch), mask)
            <= FLOAT32_LOGIT_TOLERANCE
        )


def test_transformers_load_adapter_gives_the_originals_logits(llama):
    batch = left_padded_batch(llama["model"].config.vocab_size)
    original, precomputed = clone(llama["model"]), load(llama["folder"])
    for model in (original, precomputed):
        model.load_adapter(str(llama["A"]), adapter_name="a")
    mask = batch["attention_mask"]
    assert (
        max_diff(logits(precomputed, batch), logits(original, batch), mask)
        <= FLOAT32_LOGIT_TOLERANCE
    )


def test_merge_and_unload_folds_layer_0s_part_into_the_table_and_saves(llama, tmp_path):
    from peft import PeftModel

    batch = left_padded_batch(llama["model"].config.vocab_size)
    mask = batch["attention_mask"]
    expected = logits(PeftModel.from_pretrained(clone(llama["model"]), llama["A"]), batch)
    merged = PeftModel.from_pretrained(load(llama["folder"]), llama["A"]).merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Columns"
    assert max_diff(logits(merged, batch), expected, mask) <= FLOAT32_LOGIT_TOLERANCE
    again = load(save(merged, tmp_path / "merged"))
    assert max_diff(logits(again, batch), expected, mask) <= FLOAT32_LOGIT_TOLERANCE


def test_an_int8_table_takes_an_adapter_but_refuses_to_merge_it(llama):
    from peft import PeftModel

    folder = convert(llama["model"], llama["root"] / "int8", table_dtype="int8")
    model = PeftModel.from_pretrained(load(folder), llama["A"])
    batch = left_padded_batch(llama["model"].config.vocab_size)
    model(**batch)
    with pytest.raises(FirstLayerError, match="int8 table would quantize its change anew"):
        model.merge_and_unload()


# Each family's layer-0 projections an adapter can reach exactly: every serial layout, with the
# steps before layer 0 (Gemma's scale, Granite's multiplier, BLOOM's embedding norm), no attention
# norm (OLMo 2), fused projections (Phi-3, BLOOM, MPT), q and k before a norm the model runs on
# them: per head (Qwen3, Gemma 3, Qwen3-MoE, Exaone 4, StableLM) or across all heads (OLMo 2,
# OLMoE), rank 8 on q/k/v/o and the MLP as a new user would try first.
EXACT = {
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "granite": ["q_proj", "v_proj", "down_proj"],
    "olmo2": LLAMA_TARGETS,
    "qwen3": LLAMA_TARGETS,
    "gemma3_text": LLAMA_TARGETS,
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmoe": ["q_proj", "k_proj", "o_proj"],
    "exaone4": ["q_proj", "k_proj", "v_proj"],
    "stablelm": ["q_proj", "k_proj", "v_proj"],
    "apertus": ["q_proj", "k_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "bloom": ["query_key_value", "dense"],
    "mpt": ["Wqkv"],
    "gpt_neox_serial": ["query_key_value", "dense_h_to_4h"],
}


@pytest.mark.parametrize("case", list(EXACT))
def test_every_serial_layout_takes_an_adapter_on_layer_0_exactly(case, tmp_path):
    from peft import PeftModel

    model = build_tiny(FAMILY[case])
    folder = convert(model, tmp_path / "precomputed")
    adapter = save_adapter(model, tmp_path / "adapter", EXACT[case], r=8)
    batch = left_padded_batch(model.config.vocab_size)
    mask = batch["attention_mask"]
    expected = logits(PeftModel.from_pretrained(clone(model), adapter), batch)
    assert max_diff(expected, logits(model, batch), mask) > 1e-3
    got = logits(PeftModel.from_pretrained(load(folder), adapter), batch)
    assert max_diff(got, expected, mask) <= FLOAT32_LOGIT_TOLERANCE


# What the table replaced and an adapter cannot reach exactly: refused at load, by name.
REFUSED = [
    (
        "stablelm_parallel",
        {"target_modules": ["q_proj", "v_proj"]},
        "parallel block's table rows hold x",
    ),
    ("gpt_neox", {"target_modules": ["query_key_value"]}, "parallel block's table rows hold x"),
    ("gpt_neox", {"target_modules": ["dense_h_to_4h"]}, "parallel block's layer-0 MLP"),
    ("gptj", {"target_modules": ["fc_in", "q_proj"]}, "gptj|transformer.h.0.mlp.fc_in"),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}, "replaces the input embedding"),
    ("llama", {"target_modules": ["q_proj"], "use_dora": True}, "use_dora"),
    ("llama", {"target_modules": ["v_proj"], "modules_to_save": ["embed_tokens"]}, "embed_tokens"),
]


@pytest.mark.parametrize("case, settings, reason", REFUSED, ids=lambda v: str(v)[:40])
def test_what_is_not_exact_is_refused_by_name_before_anything_is_wrapped(
    case, settings, reason, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build_tiny(FAMILY[case])
    folder = convert(model, tmp_path / "precomputed")
    config = LoraConfig(r=4, init_lora_weights=False, **settings)
    get_peft_model(clone(model), config).save_pretrained(tmp_path / "adapter")
    precomputed = load(folder)
    with pytest.raises(FirstLayerError, match=reason) as refused:
        PeftModel.from_pretrained(precomputed, tmp_path / "adapter")
    assert "layer 0" in str(refused.value) and "--adapter DIR" in str(refused.value)
    with pytest.raises(FirstLayerError, match=reason):
        get_peft_model(load(folder), LoraConfig(r=4, **settings))


def test_an_adapter_on_later_layers_of_a_parallel_block_is_exact(tmp_path):
    """A parallel block's layer-0 MLP is in the table; its other layers' MLPs are not."""
    from peft import PeftModel

    model = build_tiny(FAMILY["gpt_neox"])
    folder = convert(model, tmp_path / "precomputed")
    adapter = save_adapter(
        model, tmp_path / "adapter", ["dense_h_to_4h", "dense"], r=8, layers_to_transform=[1]
    )
    batch = left_padded_batch(model.config.vocab_size)
    expected = logits(PeftModel.from_pretrained(clone(model), adapter), batch)
    got = logits(PeftModel.from_pretrained(load(folder), adapter), batch)
    assert max_diff(got, expected, batch["attention_mask"]) <= FLOAT32_LOGIT_TOLERANCE


def test_a_folder_without_the_kept_norm_refuses_layer_0_but_takes_the_rest(llama, tmp_path):
    """A folder written before format 5 has no attention norm for layer 0's q/k/v."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(llama["folder"], old)
    weights = load_file(old / "model.safetensors")
    weights = {k: v for k, v in weights.items() if ".attn_norm." not in k}
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    del config["firstlayer"]["adapter_input"]
    config["firstlayer"]["format_version"] = 2
    (old / "config.json").write_text(json.dumps(config))
    from firstlayer.hf.models import config_class

    record_weight_files(old, config_class("llama").from_dict(config))
    with pytest.raises(FirstLayerError, match="converted before format 5: convert the source"):
        PeftModel.from_pretrained(load(old), llama["A"])
    later = save_adapter(llama["model"], tmp_path / "later", LLAMA_TARGETS, layers_to_transform=[1])
    batch = left_padded_batch(llama["model"].config.vocab_size)
    expected = logits(PeftModel.from_pretrained(clone(llama["model"]), later), batch)
    got = logits(PeftModel.from_pretrained(load(old), later), batch)
    assert max_diff(got, expected, batch["attention_mask"]) <= FLOAT32_LOGIT_TOLERANCE


def test_convert_merges_adapters_out_of_core_and_verify_compares_with_them(llama, tmp_path, capsys):
    """`firstlayer convert SOURCE OUT --adapter A --adapter B` (plain LoRA, a safetensors source:
    out of core) writes the folder the in-memory path writes from the merged model, and
    `verify --adapter` holds it to the source with the adapters applied."""
    from peft import PeftModel

    from firstlayer.cli import main

    source = tmp_path / "source"
    llama["model"].save_pretrained(source)
    argv = ["--adapter", str(llama["A"]), "--adapter", str(llama["B"])]
    assert main(["convert", str(source), str(tmp_path / "out"), *argv]) == 0
    assert "(out of core)" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "config.json").read_text())["firstlayer"]
    assert [a["name"] for a in record["adapters"]] == ["A", "B"]

    merged = clone(llama["model"])
    for adapter in ("A", "B"):
        merged = PeftModel.from_pretrained(merged, llama[adapter]).merge_and_unload()
    in_memory = convert(llama["model"], tmp_path / "in-memory", adapters=[llama["A"], llama["B"]])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (in_memory / name).read_bytes(), name

    batch = left_padded_batch(llama["model"].config.vocab_size)
    got = logits(load(tmp_path / "out"), batch)
    assert max_diff(got, logits(merged, batch), batch["attention_mask"]) <= FLOAT32_LOGIT_TOLERANCE
    assert main(["verify", str(source), str(tmp_path / "out"), *argv, "--max-new-tokens", "4"]) == 0
    assert main(["verify", str(source), str(tmp_path / "out"), "--rows", "64", *argv]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", str(source), str(tmp_path / "out"), "--max-new-tokens", "4"]) == 1


@pytest.mark.parametrize("case", ["llama", "qwen3", "gpt_neox", "gemma"])
def test_new_source_weights_compute_the_table_again_or_are_refused(case):
    """load_state_dict with the original's names: all of the table's sources together compute
    it again (the model is then the new original); some of them alone are refused by name."""
    from firstlayer import precompute

    before = build_tiny(FAMILY[case])
    after = build_tiny(FAMILY[case], seed=1)
    model = precompute(clone(before))
    batch = left_padded_batch(before.config.vocab_size)
    unchanged = logits(model, batch)
    state = after.state_dict()
    partial = {
        k: v for k, v in state.items() if ".0.self_attn." not in k and ".0.attention." not in k
    }
    with pytest.raises(FirstLayerError, match="takes them all at once or none"):
        model.load_state_dict(partial, strict=False)
    assert torch.equal(logits(model, batch), unchanged)  # refused before anything was loaded
    model.load_state_dict(state)
    got = logits(model, batch)
    assert max_diff(got, logits(after, batch), batch["attention_mask"]) <= FLOAT32_LOGIT_TOLERANCE


def test_a_folder_with_q_k_norms_in_its_table_runs_as_before_and_refuses_q_k_adapters(tmp_path):
    """A Qwen3 folder written before format 6 holds q and k after their per-head norms: it runs
    as it did, takes an adapter on v and on later layers, and refuses one on layer 0's q or k by
    name, with the fix."""
    from peft import PeftModel

    model = build_tiny(FAMILY["qwen3"])
    new = convert(model, tmp_path / "new")
    old = with_head_norms_folded(new, tmp_path / "old", model)
    assert json.loads((old / "config.json").read_text())["firstlayer"]["format_version"] == 5
    batch = left_padded_batch(model.config.vocab_size)
    mask = batch["attention_mask"]
    assert max_diff(logits(load(old), batch), logits(model, batch), mask) <= FLOAT32_LOGIT_TOLERANCE
    on_q = save_adapter(model, tmp_path / "q", ["q_proj", "v_proj"], r=8)
    with pytest.raises(FirstLayerError, match="before format 6.*convert the source again"):
        PeftModel.from_pretrained(load(old), on_q)
    on_v = save_adapter(model, tmp_path / "v", ["v_proj", "o_proj", "gate_proj"], r=8)
    expected = logits(PeftModel.from_pretrained(clone(model), on_v), batch)
    got = logits(PeftModel.from_pretrained(load(old), on_v), batch)
    assert max_diff(got, expected, mask) <= FLOAT32_LOGIT_TOLERANCE
