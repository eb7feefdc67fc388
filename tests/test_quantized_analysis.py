"""analyze on quantized configs: each scheme's bytes per Linear, which Linears it covers, bytes read
per decode step with and without the table, the stored size, and methods it does not count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from firstlayer.analysis.placement import placements
from firstlayer.analysis.quantization import quantization_of
from firstlayer.analysis.savings import analyze
from firstlayer.cli import main
from firstlayer.errors import FirstLayerError

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

# hidden 128, 4 heads of 32, 2 kv heads (e = 64), SwiGLU 256, 2 layers, vocabulary 256.
TINY = dict(
    model_type="llama",
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=256,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
Q_PROJ = "model.layers.0.self_attn.q_proj"
# Every Linear of one layer, (N out, K in).
LINEARS = {
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (64, 128),
    "self_attn.v_proj": (64, 128),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (256, 128),
    "mlp.up_proj": (256, 128),
    "mlp.down_proj": (128, 256),
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def ct(weights: dict, fmt: str, ignore=("lm_head",), targets=("Linear",)) -> dict:
    group = {"targets": list(targets), "weights": weights}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": group},
        "ignore": list(ignore),
    }


INT8_CHANNEL = ct({"num_bits": 8, "type": "int", "strategy": "channel"}, "int-quantized")
W4A16_G32 = ct(
    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}, "pack-quantized"
)
GPTQ_G32 = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
AWQ_G32 = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def config(quantization: dict | None, **overrides) -> dict:
    quantized = {"quantization_config": quantization} if quantization else {}
    return {**TINY, **quantized, **overrides}


def q_proj_bytes(quantization: dict) -> int:
    return quantization_of(config(quantization)).linear_bytes(Q_PROJ, 128, 128)


@pytest.mark.parametrize(
    ("quantization", "expected"),
    [
        pytest.param(INT8_CHANNEL, 16_640, id="int8 channel: N*K + N bf16 scales"),
        pytest.param(W4A16_G32, 9_216, id="W4A16 g32: N*K/8 int32 words + N*G scales"),
        pytest.param(GPTQ_G32, 9_984, id="GPTQ g32: qweight + scales + qzeros + g_idx"),
        pytest.param(AWQ_G32, 9_472, id="AWQ g32: qweight + scales + qzeros"),
        pytest.param(FP8_BLOCK, 16_388, id="fp8 block 128x128: N*K + one float32 a block"),
    ],
)
def test_q_proj_bytes_per_scheme(quantization, expected):
    """q_proj, 128 x 128, is 32,768 bytes in bfloat16."""
    assert q_proj_bytes(quantization) == expected


def test_a_dense_config_counts_the_model_dtype():
    assert quantization_of(config(None)) is None
    a = analyze(config(None), accounting="exact")
    assert a.weight_bytes.stored == 2 * a.total_weights
    assert not a.is_quantized
    # A Linear a scheme leaves alone stays in the model's dtype: 128 x 128 in bfloat16.
    assert quantization_of(config(FP8_BLOCK)).linear_bytes("lm_head", 128, 128) == 32_768


@pytest.mark.parametrize(
    ("quantization", "expected"),
    [
        ({**FP8_BLOCK, "scale_fmt": "ue8m0"}, 128 * 128 + 1),
        ({"quant_method": "fp8"}, 128 * 128 + 4),  # no blocks: one float32 scale per tensor
        (
            ct({"num_bits": 8, "type": "float", "strategy": "tensor"}, "float-quantized"),
            128 * 128 + 2,
        ),
        (
            ct(
                {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 64]},
                "float-quantized",
            ),
            128 * 128 + 2 * 2 * 2,
        ),
        (
            ct(
                {"num_bits": 8, "type": "int", "strategy": "channel", "scale_dtype": "float32"},
                "int-quantized",
            ),
            128 * 128 + 128 * 4,
        ),
        (
            ct(
                {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": False},
                "int-quantized",
            ),
            128 * 128 + 128 * 2 + 128,  # int8 zero points, one per scale
        ),
        (
            ct(
                {
                    "num_bits": 4,
                    "type": "int",
                    "strategy": "group",
                    "group_size": 32,
                    "symmetric": False,
                },
                "pack-quantized",
            ),
            9_216 + 16 * 4 * 4,  # zero points packed along N: ceil(N*4/32) words per group
        ),
        ({**GPTQ_G32, "group_size": -1}, 8192 + 128 * 2 + 16 * 4 + 128 * 4),
        (
            {**AWQ_G32, "w_bit": 4, "bits": None, "q_group_size": 64, "group_size": None},
            9_472 - 2 * 128 * 2 - 2 * 16 * 4,
        ),
    ],
)
def test_scheme_variants(quantization, expected):
    assert q_proj_bytes(quantization) == expected


def test_exclusions_leave_linears_in_the_model_dtype():
    dense = 128 * 128 * 2
    cases = {
        "ct ignore, regex": ct(
            {"num_bits": 8, "type": "int", "strategy": "channel"},
            "int-quantized",
            ignore=["lm_head", r"re:model\.layers\.0\.self_attn\..*"],
        ),
        "ct targets": ct(
            {"num_bits": 8, "type": "int", "strategy": "channel"},
            "int-quantized",
            targets=[r"re:.*mlp\..*"],
        ),
        "fp8 modules_to_not_convert": {
            **FP8_BLOCK,
            "modules_to_not_convert": ["layers.0.self_attn"],
        },
        "awq modules_to_not_convert": {**AWQ_G32, "modules_to_not_convert": ["self_attn"]},
        "gptq dynamic negative": {**GPTQ_G32, "dynamic": {r"-:model\.layers\.0\..*": {}}},
        "gptq modules_in_block_to_quantize": {
            **GPTQ_G32,
            "modules_in_block_to_quantize": [["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]],
        },
    }
    for case, quantization in cases.items():
        scheme = quantization_of(config(quantization))
        assert scheme.linear_bytes(Q_PROJ, 128, 128) == dense, case
        assert scheme.linear_bytes("model.layers.1.mlp.up_proj", 256, 128) < 256 * 128 * 2, case


def test_gptq_dynamic_overrides_and_lm_head():
    scheme = quantization_of(config({**GPTQ_G32, "dynamic": {r"+:.*down_proj": {"bits": 8}}}))
    assert scheme.linear_bytes("model.layers.1.mlp.down_proj", 128, 256) == (
        256 * 128 // 4 * 4 + 8 * 128 * 2 + 8 * 32 * 4 + 256 * 4
    )
    assert scheme.format_of("model.layers.1.mlp.down_proj").label == "int8 GPTQ g32"
    assert scheme.format_of("lm_head") is None
    assert quantization_of(config({**GPTQ_G32, "lm_head": True})).format_of("lm_head") is not None


def test_the_lm_head_is_quantized_only_where_the_scheme_says_so():
    for quantization in (FP8_BLOCK, AWQ_G32, INT8_CHANNEL):
        assert quantization_of(config(quantization)).format_of("lm_head") is None
    everything = ct({"num_bits": 8, "type": "int", "strategy": "channel"}, "int-quantized", ())
    assert quantization_of(config(everything)).format_of("lm_head") is not None


def gptq_tensors(n: int, k: int, bits: int = 4, group: int = 32) -> list[tuple[tuple, int]]:
    """A GPTQ Linear's tensors as a checkpoint holds them: (shape, bytes per element)."""
    groups = math.ceil(k / group)
    return [
        ((k * bits // 32, n), 4),  # qweight, int32
        ((groups, n * bits // 32), 4),  # qzeros, int32
        ((groups, n), 2),  # scales, float16
        ((k,), 4),  # g_idx, int32
    ]


def fp8_tensors(n: int, k: int, block: int = 128) -> list[tuple[tuple, int]]:
    return [((n, k), 1), ((math.ceil(n / block), math.ceil(k / block)), 4)]  # weight_scale_inv


def checkpoint_bytes(linear_tensors, dtype_bytes: int) -> tuple[int, int]:
    """Every tensor of the tiny Llama checkpoint, summed from shapes; and layer 0's q/k/v."""
    tensors = [((256, 128), dtype_bytes), ((256, 128), dtype_bytes), ((128,), dtype_bytes)]
    qkv0 = 0
    for layer in range(2):
        tensors += [((128,), dtype_bytes), ((128,), dtype_bytes)]  # the layer's two RMSNorms
        for name, (n, k) in LINEARS.items():
            linear = linear_tensors(n, k)
            tensors += linear
            if layer == 0 and name in QKV:
                qkv0 += sum(math.prod(shape) * size for shape, size in linear)
    return sum(math.prod(shape) * size for shape, size in tensors), qkv0


@pytest.mark.parametrize(
    ("quantization", "linear_tensors", "dtype"),
    [
        (GPTQ_G32, gptq_tensors, "float16"),
        (FP8_BLOCK, fp8_tensors, "bfloat16"),
    ],
)
def test_stored_size_is_the_checkpoint_tensors(quantization, linear_tensors, dtype):
    a = analyze(config(quantization, torch_dtype=dtype), accounting="exact")
    stored, qkv0 = checkpoint_bytes(linear_tensors, 2)
    assert a.weight_bytes.stored == stored
    # The serial table keeps layer 0's attention norm (for adapters): only Q, K, V leave.
    assert a.weight_bytes.freed == qkv0
    by_dtype = {p.table_dtype: p for p in placements(a)}
    bf16_table = 256 * (128 + 2 * 64) * 2
    int8_table = 256 * ((128 + 2 * 64) + 3 * 4)
    assert by_dtype["bfloat16"].stored == stored - qkv0 + bf16_table
    assert by_dtype["int8"].stored == stored - qkv0 + int8_table


def test_bytes_read_per_step_swap_layer0_qkv_for_table_rows():
    a = analyze(config(GPTQ_G32, torch_dtype="float16"), accounting="exact")
    stored, qkv0 = checkpoint_bytes(gptq_tensors, 2)
    for b in a.batches:
        # A step reads every weight but the input embedding, then B embedding rows.
        without = stored - 256 * 128 * 2 + b * 128 * 2
        assert a.bytes_read_per_step(b, False) == without
        # Layer 0's input norm is read either way (the table module applies it for adapters).
        norm = 128 * 2
        with_bf16 = without - (qkv0 + norm) - b * 128 * 2 + b * (128 + 256) * 2
        assert a.bytes_read_per_step(b, True) == with_bf16
        assert a.decode_ceiling(b) == without / with_bf16
        int8 = next(p for p in placements(a) if p.table_dtype == "int8")
        row = 128 * 2 + 256 + 3 * 4  # x in the model's dtype, q/k/v in int8 with 3 scales
        index = a.batches.index(b)
        assert int8.reads_per_step[index] == without - (qkv0 + norm) - b * 128 * 2 + b * row


def test_an_int4_layer0_saves_less_than_a_dense_one_and_large_batches_can_lose():
    dense = analyze(config(None), accounting="exact", batches=(1, 64))
    int4 = analyze(config(GPTQ_G32, torch_dtype="float16"), accounting="exact", batches=(1, 64))
    assert int4.decode_ceiling(1) < dense.decode_ceiling(1)
    # 64 rows of q/k/v in float16 weigh more than layer 0's int4 Q, K and V.
    assert int4.decode_ceiling(64) < 1 < dense.decode_ceiling(64)


def test_a_parallel_block_frees_its_mlp_at_the_quantized_size():
    # GPT-NeoX: 4 heads of 32 for q, k and v alike, a 2-matrix MLP 512 wide, parallel blocks.
    neox = config(None, model_type="gpt_neox", intermediate_size=512, num_key_value_heads=4)
    neox["use_parallel_residual"] = True
    dense = analyze(neox, accounting="exact")
    fp8 = analyze({**neox, "quantization_config": FP8_BLOCK}, accounting="exact")
    assert dense.dims.is_parallel
    # Q, K, V and the MLP (up 512x128, down 128x512) leave at one byte a weight plus block scales.
    saved = (128 * 128 + 4) * 3 + (512 * 128 + 4 * 4) * 2
    assert (
        fp8.weight_bytes.freed
        == dense.weight_bytes.freed - 2 * (3 * 128 * 128 + 2 * 512 * 128) + saved
    )


def test_moe_experts_are_stored_alike():
    mixtral = config(FP8_BLOCK, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    a = analyze(mixtral, accounting="exact")
    dense = analyze({**mixtral, "quantization_config": None}, accounting="exact")
    per_linear = {
        (n, k): 2 * n * k - (n * k + math.ceil(n / 128) * math.ceil(k / 128) * 4)
        for n, k in LINEARS.values()
    }
    saved_per_layer = sum(per_linear[LINEARS[n]] for n in LINEARS if n.startswith("self_attn"))
    saved_per_layer += 4 * sum(per_linear[LINEARS[n]] for n in LINEARS if n.startswith("mlp"))
    assert a.weight_bytes.stored == dense.weight_bytes.stored - 2 * saved_per_layer


def test_mxfp4_covers_the_experts_only():
    gpt_oss = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    scheme = quantization_of(config(gpt_oss))
    # Two 4-bit values a byte and one 1-byte scale per 32 inputs: 256 x 128 -> 16,384 + 1,024.
    assert scheme.linear_bytes("model.layers.1.mlp.experts.7.up_proj", 256, 128) == 17_408
    assert scheme.format_of(Q_PROJ) is None
    assert scheme.format_of("model.layers.1.mlp.router") is None


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq"])
def test_an_unknown_method_is_refused_by_name(method):
    with pytest.raises(FirstLayerError, match=f"'{method}'.*compressed-tensors, fp8, gptq, awq"):
        analyze(config({"quant_method": method}))


def test_an_unknown_compressed_tensors_format_is_refused_by_name():
    sparse = ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, "marlin-24")
    with pytest.raises(FirstLayerError, match="'marlin-24'.*pack-quantized"):
        analyze(config(sparse))


def test_gguf_keeps_the_dense_count():
    a = analyze(config({"quant_method": "gguf"}), accounting="exact")
    assert not a.is_quantized
    assert a.decode_ceiling(1) == analyze(config(None), accounting="exact").decode_ceiling(1)


def write(tmp_path, name: str, quantization: dict | None) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config(quantization)))
    return str(path)


def test_the_cli_names_the_scheme_and_prints_bytes(tmp_path, capsys):
    fp8, gptq = write(tmp_path, "fp8", FP8_BLOCK), write(tmp_path, "gptq", GPTQ_G32)
    assert main(["analyze", fp8, gptq, "--accounting", "exact", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "| weights " in out and "fp8 block 128x128" in out and "int4 GPTQ g32" in out
    assert "Weights as stored, in bytes" in out
    assert "with a table in int8" in out
    assert main(["analyze", write(tmp_path, "dense", None)]) == 0
    assert "Weights as stored" not in capsys.readouterr().out


def test_the_cli_json_carries_the_bytes(tmp_path, capsys):
    assert main(["analyze", write(tmp_path, "gptq", GPTQ_G32), "--json", "--batch", "1"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["weight_bytes"]["scheme"] == "int4 GPTQ g32"
    assert record["weight_bytes"]["method"] == "gptq"
    assert record["weight_bytes"]["reads_per_step"][0]["batch"] == 1
    int8 = record["table_memory"][-1]
    assert int8["table_dtype"] == "int8" and len(int8["reads_per_step"]) == 1


def test_the_cli_refuses_an_unknown_method_in_one_line(tmp_path, capsys):
    assert main(["analyze", write(tmp_path, "bnb", {"quant_method": "bitsandbytes"})]) == 2
    err = capsys.readouterr().err
    assert "'bitsandbytes'" in err and "awq" in err and "Traceback" not in err


def test_the_readme_releases_analyze(capsys):
    for name in ("qwen3-8b-fp8", "llama-3.1-8b-instruct-gptq-int4"):
        path = BENCHMARKS / f"{name}.json"
        assert main(["analyze", str(path), "--accounting", "exact"]) == 0
        assert "Weights as stored" in capsys.readouterr().out
