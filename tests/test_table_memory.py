"""The table's memory: stored dtypes (int8 with per-row scales), a loaded table memory-mapped
in its stored dtype, resident only for the rows read, and a clear error when its file changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch
from safetensors import safe_open

from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import WEIGHTS_FILE, check
from firstlayer.hf.loading import load
from firstlayer.table.codec import (
    TABLE_DTYPES,
    column_segments,
    dequantize_int8,
    quantize_int8,
)
from firstlayer.tools.verify import verify

SERIAL, PARALLEL = FAMILIES[0], next(f for f in FAMILIES if f.id == "gpt_neox")


def test_int8_rounds_each_entry_to_half_a_step_of_its_rows_range():
    rows = torch.randn(64, 48) * torch.logspace(-2, 2, 64).unsqueeze(1)  # rows of any scale
    ranges = ((0, 16), (16, 40), (40, 48))
    codes, scales = quantize_int8(rows, ranges)
    assert codes.dtype == torch.int8 and scales.shape == (64, 3)
    back = dequantize_int8(codes, scales, column_segments(ranges))
    for i, (start, stop) in enumerate(ranges):
        step = rows[:, start:stop].abs().amax(1, keepdim=True) / 127
        assert torch.all((back - rows)[:, start:stop].abs() <= step / 2 * (1 + 1e-5))
        assert torch.equal(scales[:, i : i + 1], step)


@pytest.mark.parametrize("family", [SERIAL, PARALLEL], ids=lambda f: f.id)
@pytest.mark.parametrize("table_dtype", ["float16", "int8"])
def test_reduced_table_is_stored_so_and_verify_reports_its_error(family, table_dtype, tmp_path):
    """The qkv block (a parallel row's residual block too) in the table dtype; a serial row's x
    columns, which the tied LM head reads, in the model's."""
    original = build_tiny(family)
    out = convert(clone(original), tmp_path / "out", table_dtype=table_dtype)
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    # Format 5 for a serial folder (it keeps layer 0's attention norm), else 4 for int8, else 2.
    plain = 4 if table_dtype == "int8" else 2
    assert record["format_version"] == (plain if family is PARALLEL else 5)
    assert record["table"]["dtype"] == table_dtype
    module = record["table"]["module"]
    stored = TABLE_DTYPES[table_dtype]
    with safe_open(out / WEIGHTS_FILE, "pt") as weights:
        assert weights.get_tensor(f"{module}.qkv").dtype == stored
        residual = weights.get_tensor(f"{module}.residual").dtype
        assert residual == (stored if family is PARALLEL else torch.float32)
        names = set(weights.keys())
    assert (f"{module}.qkv_scale" in names) == (table_dtype == "int8")
    assert (f"{module}.residual_scale" in names) == (table_dtype == "int8" and family is PARALLEL)
    model = load(out)
    report = verify(original, model, max_new_tokens=8)
    assert (report.dtype, report.table_dtype) == ("float32", table_dtype)
    table_max, table_mean = report.table_error
    assert 0 < table_mean <= table_max
    assert report.baseline_dtype == "bfloat16" and report.passed, report
    assert report.token_agreement > 0.9


def test_a_declaration_says_fused_exactly_where_its_parts_name_one_projection():
    """The analyser reads `is_fused_qkv` (torch-free); the runtime finds the projections."""
    from firstlayer.families import family_of
    from firstlayer.hf.patch import parts_of

    for family in FAMILIES:
        parts, _ = parts_of(build_tiny(family))
        is_fused = family_of(family.model_type).is_fused_qkv
        assert (len(parts.projections) == 1) == is_fused, family.id


def test_a_fused_projection_gets_an_int8_scale_per_head_and_per_row(tmp_path):
    """GPT-NeoX interleaves q, k and v per head in one projection: no scale may span two of
    them, so each head's columns get their own; analyze counts the same bytes."""
    from firstlayer.analysis.placement import placements
    from firstlayer.analysis.savings import analyze

    original = build_tiny(PARALLEL)
    out = convert(clone(original), tmp_path / "out", table_dtype="int8")
    table = json.loads((out / "config.json").read_text())["firstlayer"]["table"]
    config = original.config
    head_size = config.hidden_size // config.num_attention_heads
    assert table["scale_width"] == head_size
    with safe_open(out / WEIGHTS_FILE, "pt") as weights:
        module = table["module"]
        qkv, qkv_scale = (
            weights.get_tensor(f"{module}.qkv"),
            weights.get_tensor(f"{module}.qkv_scale"),
        )
        stored = sum(
            weights.get_tensor(f"{module}.{n}").nbytes
            for n in ("qkv", "qkv_scale", "residual", "residual_scale")
        )
    assert qkv_scale.shape == (config.vocab_size, 3 * config.num_attention_heads)
    assert qkv.shape[1] == 3 * config.hidden_size
    int8 = next(
        p
        for p in placements(analyze(config.to_dict(), accounting="exact"))
        if p.table_dtype == "int8"
    )
    assert int8.table_bytes == stored


def test_a_conversion_past_its_bound_is_refused_unless_accepted(tmp_path, monkeypatch):
    from firstlayer.conversion import selfcheck

    monkeypatch.setitem(selfcheck.RELATIVE_TOLERANCE, torch.int8, 1e-6)
    model = build_tiny(SERIAL)
    with pytest.raises(FirstLayerError, match="self-check failed"):
        convert(clone(model), tmp_path / "refused", table_dtype="int8")
    assert not (tmp_path / "refused").exists()
    out = convert(clone(model), tmp_path / "accepted", table_dtype="int8", accept_error=True)
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    accepted = record["accepted_row_error"]
    assert accepted["max"] > accepted["tolerance"] >= 1e-6


def test_loaded_table_is_mapped_in_its_stored_dtype_whatever_the_model_runs_in(tmp_path):
    """Also through plain transformers; .to(dtype) leaves the mapped blocks as they are."""
    from transformers import AutoModelForCausalLM

    original = build_tiny(PARALLEL)
    out = convert(clone(original), tmp_path / "out", table_dtype="int8")
    batch = left_padded_batch(original.config.vocab_size)
    expected = load(out)(**batch).logits
    for model in (
        load(out, dtype="bfloat16"),
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16),
        load(out).to(torch.bfloat16),
    ):
        table = model.get_input_embeddings()
        assert table.host_blocks == {"qkv", "qkv_scale", "residual", "residual_scale"}
        assert table.files
        for name in ("qkv", "qkv_scale", "residual", "residual_scale"):
            block = getattr(table, name)
            assert block.dtype == (torch.float32 if "scale" in name else torch.int8), name
        logits = model(**batch).logits
        assert logits.dtype == torch.bfloat16
        assert (logits.float() - expected).abs().max() < 0.1


RESIDENT = """
import json, sys, torch
import firstlayer
from transformers import AutoModelForCausalLM
folder, dtype = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
with torch.inference_mode():
    model.generate(torch.arange(8)[None] * 997, max_new_tokens=4, do_sample=False)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps(rss * 1024))
"""


def resident_bytes(folder, dtype: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RESIDENT, str(folder), dtype],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "table_dtype, dtype", [("float32", "float32"), ("bfloat16", "float32"), ("int8", "bfloat16")]
)
def test_large_table_costs_disk_not_resident_memory(table_dtype, dtype, tmp_path):
    """A 64k-token vocabulary with q/k/v 12x wider than the embedding: the table is up to 200 MB
    on disk, and a loaded model (in the table's dtype or another) holds about the original's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=65_536,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    original.save_pretrained(tmp_path / "original")
    out = convert(original, tmp_path / "out", table_dtype=table_dtype)
    table_bytes = 65_536 * 3 * 256 * TABLE_DTYPES[table_dtype].itemsize  # the qkv block
    assert (out / WEIGHTS_FILE).stat().st_size > table_bytes
    before, after = resident_bytes(tmp_path / "original", dtype), resident_bytes(out, dtype)
    # A resident q/k/v block would add at least table_bytes. Measured, the loaded model grows by
    # 8 to 14% of it (4-16 MB here: the rows looked up, the scales, the residual block's pages),
    # so the bound is a quarter, not a closer fit that a busy machine breaks.
    assert after - before < table_bytes / 4, (before, after)


def test_a_mapped_file_truncated_or_replaced_underneath_gives_a_clear_error(tmp_path):
    original = build_tiny(SERIAL)
    out = convert(clone(original), tmp_path / "out")
    batch = left_padded_batch(original.config.vocab_size)
    model = load(out)
    model(**batch)
    weights = out / WEIGHTS_FILE
    data = weights.read_bytes()
    os.truncate(weights, len(data) // 2)
    with pytest.raises(FirstLayerError, match="truncated or rewritten after the model was loaded"):
        model(**batch)
    with pytest.raises(FirstLayerError, match="is truncated or was replaced"):
        check(out)
    weights.write_bytes(data)  # the same size again, rewritten in place: still refused
    with pytest.raises(FirstLayerError, match="load the model again"):
        model(**batch)
    model = load(out)
    expected = model(**batch).logits
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)  # renamed over, then removed: the mapping keeps the file it loaded
    weights.write_bytes(moved.read_bytes()[:100])
    moved.unlink()
    assert torch.equal(model(**batch).logits, expected)


def test_precompute_keeps_a_serial_tied_lm_head_in_the_models_dtype():
    from firstlayer import precompute

    model = build_tiny(SERIAL)
    precompute(model, dtype=torch.int8)
    table = model.get_input_embeddings()
    assert table.qkv.dtype == torch.int8 and table.residual.dtype == torch.float32
    assert model.get_output_embeddings().weight is table.residual
    batch = left_padded_batch(model.config.vocab_size)
    assert model(**batch).logits.dtype == torch.float32


def test_placement_by_table_dtype_is_the_hand_arithmetic():
    """SmolLM2: 49,152 rows of q/k/v 576 + 2 x 192 columns; layer 0 loses 553,536 weights, of
    which the table module keeps the attention norm's 576 (for adapters)."""
    from firstlayer.analysis.placement import placements
    from firstlayer.analysis.savings import analyze

    by_dtype = {p.table_dtype: p for p in placements(analyze("default", accounting="exact"))}
    eliminated = (553_536 - 576) * 2  # bfloat16 bytes
    assert by_dtype["float32"].table_bytes == 49_152 * 960 * 4
    assert by_dtype["int8"].table_bytes == 49_152 * (960 + 3 * 4)
    for p in by_dtype.values():
        assert p.on_device == (p.table_bytes - eliminated, 0)
        assert p.on_host == (-eliminated, p.table_bytes)


def test_analyze_prints_memory_by_table_dtype_for_accelerator_and_host(capsys):
    from firstlayer.cli import main

    assert main(["analyze", "default", "--accounting", "exact"]) == 0
    out = capsys.readouterr().out
    assert "Memory change by table dtype" in out
    assert "int8 table: accelerator (table on it)" in out
    assert main(["analyze", "pythia-6.9b", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]["table_memory"]
    assert [p["table_dtype"] for p in record] == ["float32", "bfloat16", "float16", "int8"]


def test_bench_tables_times_mapped_and_int8_against_the_in_memory_table(tmp_path, capsys):
    """No time is asserted: every variant runs after a warm-up, ratios come per round."""
    from firstlayer.render.text import format_table_bench
    from firstlayer.tools.bench import TABLE_VARIANTS, bench_tables

    result = bench_tables(build_tiny(SERIAL), tmp_path, batches=(1, 2), new_tokens=3, repeats=3)
    assert [r.batch for r in result.results] == [1, 2]
    for r in result.results:
        assert list(r.decode_ms) == list(TABLE_VARIANTS)
        assert list(r.ratio) == list(TABLE_VARIANTS[1:])
        assert all(s.low <= s.median <= s.high for s in r.ratio.values())
    assert result.table_bytes["mapped int8"] < result.table_bytes["mapped float32"]
    text = format_table_bench(result)
    assert "mapped int8" in text and "3 rounds" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("table_dtype", ["float32", "int8"])
def test_on_cuda_the_table_can_stay_in_host_memory(table_dtype, tmp_path):
    """Mapped or host: the blocks stay on the host, each call copies its rows over (the host
    copy page-locked); the logits are the CPU model's. `device` puts the table where every
    weight goes."""
    original = build_tiny(PARALLEL)
    out = convert(clone(original), tmp_path / "out", table_dtype=table_dtype)
    batch = left_padded_batch(original.config.vocab_size)
    expected = load(out)(**batch).logits
    on_cuda = {k: v.cuda() for k, v in batch.items()}
    for memory in ("mapped", "host"):
        model = load(out, device="cuda", table_memory=memory)
        table = model.get_input_embeddings()
        assert table.qkv.device.type == "cpu" and table.residual.device.type == "cpu"
        assert table.qkv.is_pinned() == (memory == "host")
        assert (model(**on_cuda).logits.cpu() - expected).abs().max() < 1e-4
        model.generate(**on_cuda, max_new_tokens=4, pad_token_id=0)
    model = load(out, device="cuda", table_memory="device")
    assert model.get_input_embeddings().qkv.device.type == "cuda"
    assert (model(**on_cuda).logits.cpu() - expected).abs().max() < 1e-4


def test_table_memory_is_one_of_the_named_placements(tmp_path):
    model = build_tiny(SERIAL)
    out = convert(model, tmp_path / "out")
    batch = left_padded_batch(model.config.vocab_size)
    expected = model(**batch).logits
    with pytest.raises(FirstLayerError, match="is not one of device, host, mapped"):
        load(out, table_memory="disk")
    table = load(out, table_memory="device").get_input_embeddings()
    assert not table.host_blocks and not table.files
    host = load(out, table_memory="host")
    table = host.get_input_embeddings()
    assert table.host_blocks == {"qkv"} and not table.files  # a copy, not the file
    assert (host(**batch).logits - expected).abs().max() <= 1e-5
    with pytest.warns(FutureWarning, match="'pinned' is now called 'host'"):
        renamed = load(out, table_memory="pinned")
    assert renamed.get_input_embeddings().host_blocks == {"qkv"}


def test_q_and_k_stored_before_their_norm_get_an_int8_scale_per_head(tmp_path):
    """A serial Qwen3's table holds q and k before the per-head norm its model runs (format 6);
    the norm scales each head to the same size, so a head quantized on the scale of a larger
    one would come out of it with that larger one's error: each head gets its own scale, and
    what attention sees after the norm stays within int8's error, however the heads' sizes
    differ (trained models' do)."""
    from firstlayer.analysis.placement import placements
    from firstlayer.analysis.savings import analyze

    qwen3 = next(f for f in FAMILIES if f.id == "qwen3")
    original = build_tiny(qwen3)
    config = original.config
    heads, kv_heads, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    attention = original.model.layers[0].self_attn
    with torch.no_grad():  # heads from 1x to 30x the smallest one's size
        sizes = torch.logspace(0, 1.5, heads)
        attention.q_proj.weight.view(heads, head_dim, -1).mul_(sizes[:, None, None])
        attention.k_proj.weight.view(kv_heads, head_dim, -1).mul_(sizes[:kv_heads, None, None])
    exact = load(convert(clone(original), tmp_path / "float32"))
    out = convert(clone(original), tmp_path / "int8", table_dtype="int8")
    table = json.loads((out / "config.json").read_text())["firstlayer"]["table"]
    assert table["scale_width"] == head_dim
    with safe_open(out / WEIGHTS_FILE, "pt") as weights:
        module = table["module"]
        assert weights.get_tensor(f"{module}.qkv_scale").shape == (
            config.vocab_size,
            heads + 2 * kv_heads,
        )
        stored = (
            sum(
                weights.get_tensor(f"{module}.{n}").nbytes for n in ("qkv", "qkv_scale", "residual")
            )
            - weights.get_tensor(f"{module}.residual").nbytes
        )  # the embedding itself
    int8 = next(
        p
        for p in placements(analyze(config.to_dict(), accounting="exact"))
        if p.table_dtype == "int8"
    )
    assert int8.table_bytes == stored
    ids = torch.arange(config.vocab_size)[None]

    def normed_q(model):
        rows = model.get_input_embeddings().rows(ids)[0, :, : heads * head_dim]
        norm = model.model.layers[0].self_attn.q_norm
        return norm(rows.unflatten(-1, (heads, head_dim)))  # what RoPE and attention receive

    with torch.no_grad():
        error = (normed_q(load(out)) - normed_q(exact)).abs().max().item()
    # int8's own bound on a head normed to RMS 1 (gains ~1): 127 steps of its largest entry.
    assert error < 0.05, error
