"""save / load / convert: a self-contained folder that loads without the original checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch
from safetensors import safe_open

from firstlayer import precompute
from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import WEIGHTS_FILE
from firstlayer.hf.loading import load, save
from firstlayer.hf.patch import parts_of
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE, verify


def test_convert_then_load_matches_original(tiny, tmp_path):
    """load is from_pretrained: logits, greedy and beam search as the original's (the other
    generate() modes run on the same classes in test_runtime, from a table in memory)."""
    original = clone(tiny)
    out = convert(tiny, tmp_path / "out")
    model = load(out)
    report = verify(original, model, tokenizer=None, max_new_tokens=32)
    assert report.max_logit_diff <= FLOAT32_LOGIT_TOLERANCE
    assert report.greedy_equal and report.greedy_tokens == 32
    batch = left_padded_batch(original.config.vocab_size)
    settings = dict(max_new_tokens=32, min_new_tokens=32, pad_token_id=0, num_beams=4)
    expected = original.generate(**batch, **settings)
    assert torch.equal(expected, model.generate(**batch, **settings))


def test_convert_leaves_the_source_model_untouched(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    convert(tiny, tmp_path / "out")
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saved_folder_holds_the_table_and_none_of_the_eliminated_weights(tiny, tmp_path):
    out = convert(tiny, tmp_path / "out")
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    with safe_open(out / WEIGHTS_FILE, "pt") as weights:
        names = set(weights.keys())
        module, vocab_size = record["table"]["module"], tiny.config.vocab_size
        hidden, width = record["table"]["hidden_size"], record["table"]["width"]
        assert weights.get_slice(f"{module}.residual").get_shape() == [vocab_size, hidden]
        assert weights.get_slice(f"{module}.qkv").get_shape() == [vocab_size, width - hidden]
    for module in record["eliminated"]:
        assert not any(n.startswith(module + ".") for n in names), module
    if record["lm_head"]["reads_table"]:
        assert f"{record['lm_head']['module']}.weight" not in names  # not stored twice
    assert record["source_fingerprint"]
    run_head_norms = parts_of(tiny)[0].run_head_norms.values()
    if run_head_norms:
        # Format 6: the table holds q and k before their norms, which the folder keeps.
        assert record["format_version"] == 6 and record["head_norms"] == "at_run_time"
        for norm in run_head_norms:
            assert any(n.startswith(norm + ".") for n in names), norm
            assert norm not in record["eliminated"]
    if record["architecture"] == "serial" and record["adapter_input"] == "attn_norm":
        # Format 5 (6 with q/k norms): the table module keeps layer 0's attention norm.
        assert record["format_version"] == (6 if run_head_norms else 5)
        norm = dict(tiny.named_modules())[record["eliminated"][0]]  # layer 0's attention norm
        table = record["table"]["module"]
        kept = {n.removeprefix(f"{table}.attn_norm.") for n in names if ".attn_norm." in n}
        assert kept == set(norm.state_dict())  # none for OLMo's norms without weights
    elif not run_head_norms:
        assert record["format_version"] == 2  # a float table
    assert record["files"][WEIGHTS_FILE]["bytes"] == (out / WEIGHTS_FILE).stat().st_size


def test_save_of_precomputed_model_equals_streamed_convert(tiny, tmp_path):
    streamed = convert(clone(tiny), tmp_path / "streamed")
    saved = save(precompute(tiny), tmp_path / "saved")
    with safe_open(streamed / WEIGHTS_FILE, "pt") as a, safe_open(saved / WEIGHTS_FILE, "pt") as b:
        names = set(a.keys())
        assert names == set(b.keys())
        for name in names:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_same_input_gives_byte_identical_output(tmp_path):
    family = next(f for f in FAMILIES if f.id == "qwen3")
    first = convert(build_tiny(family), tmp_path / "a")
    second = convert(build_tiny(family), tmp_path / "b")
    for name in ("config.json", WEIGHTS_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_chunked_table_covers_every_row_once(monkeypatch):
    import firstlayer.table.build

    family = next(f for f in FAMILIES if f.id == "gpt_neox")
    whole = precompute(build_tiny(family)).get_input_embeddings().table()
    # 256 rows: 36 chunks and a ragged end
    monkeypatch.setattr(firstlayer.table.build, "CHUNK_ROWS", 7)
    chunked = precompute(build_tiny(family)).get_input_embeddings().table()
    # Matmuls over 7 rows may sum in another order than over 256: equal to rounding, not bits.
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_bfloat16_conversion_is_closer_than_the_original_in_bfloat16(tiny, tmp_path):
    """Where the models differ, layer 0, the table is at least as close to float32 as the
    original's own bf16 arithmetic, entry by entry; end to end both carry the other layers'
    bf16 rounding and verify reports both errors."""
    from firstlayer.tools.verify import REDUCED_PRECISION_LOGIT_FACTOR

    original = tiny
    model = load(convert(clone(original), tmp_path / "bf16", dtype="bfloat16"))
    assert model.get_input_embeddings().qkv.dtype == torch.bfloat16
    report = verify(original, model)
    (table_max, table_mean), (bf16_max, bf16_mean) = (
        report.table_error,
        report.baseline_layer0_error,
    )
    assert table_max <= bf16_max and table_mean < bf16_mean
    assert report.baseline_max_logit_diff is not None
    limit = REDUCED_PRECISION_LOGIT_FACTOR * report.baseline_mean_logit_diff
    assert 0 < report.mean_logit_diff <= limit
    assert report.passed


def test_existing_output_is_not_overwritten_without_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FirstLayerError, match="exists: .*--force"):
        convert(tiny, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_convert_refuses_a_precomputed_model(tiny, tmp_path):
    with pytest.raises(FirstLayerError, match="precomputed already"):
        convert(precompute(tiny), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_model_that_is_not_precomputed(tiny, tmp_path):
    with pytest.raises(FirstLayerError, match="precompute first"):
        save(tiny, tmp_path / "out")


def test_load_refuses_a_plain_model_folder(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "plain")
    with pytest.raises(FirstLayerError, match="not a precomputed model"):
        load(tmp_path / "plain")
