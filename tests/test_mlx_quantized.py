"""Folders mlx-lm quantized (`mlx_lm.convert --quantize`) convert as they are (issue 26 item 3):
layer 0's weights and the embedding dequantized as mlx does into a 16-bit table, every other
tensor kept in mlx's packing, and the folder runs in mlx-lm within float16 rounding of the
original quantized folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

mlx_lm = pytest.importorskip(
    "mlx_lm", reason="mlx-lm is installed in .venv only (`pip install 'firstlayer[mlx]'`)"
)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import FAMILIES, build_tiny  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.convert import convert as mlx_convert  # noqa: E402
from test_mlx import MLX_RUNS_ORIGINAL, PROMPT, prompt_and_decode_logits, tiny_tokenizer  # noqa: E402

from firstlayer.conversion import convert_source  # noqa: E402
from firstlayer.conversion.quantized import MLX_BITS, dequantize  # noqa: E402
from firstlayer.errors import FirstLayerError  # noqa: E402
from firstlayer.mlx.models import legacy_rope_fields  # noqa: E402

# Both folders run in float16; the table's q/k/v rows are layer 0's in float32 rounded once, where
# mlx's CPU kernel sums its quantized product serially in float16; a serial model's tied LM head
# multiplies the 16-bit table instead of the packed embedding. Measured: at most 0.004 on logits
# of magnitude ~1 (a few float16 units), greedy tokens the same.
FLOAT16_ROUNDING = 1e-2
# Serial (tied) and parallel at both widths; a serial GPT-NeoX, whose weights mlx-lm renames
# (`gpt_neox.layers.N` -> `model.h.N`), for a residual block kept under transformers' name.
CASES = [("llama", 4), ("llama", 8), ("gpt_neox", 4), ("gpt_neox", 8), ("gpt_neox_serial", 4)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(family id, bits, mode) -> (the float16 folder mlx-lm quantized, its converted folder or
    None), each made once."""
    made: dict[tuple, tuple[Path, Path | None]] = {}

    def folders(
        family_id: str,
        bits: int,
        mode: str = "affine",
        predicate=None,
        convert=True,
        dtype: str = "float16",
    ):
        key = (family_id, bits, mode, predicate is not None, dtype)
        if key not in made:
            family = next(f for f in FAMILIES if f.id == family_id)
            settings = {**family.extra, **MLX_RUNS_ORIGINAL.get(family_id, {})}
            # Saved in float32, cast by mlx_lm.convert, which leaves config.json's dtype float32.
            model = build_tiny(dataclasses.replace(family, extra=settings))
            root = tmp_path_factory.mktemp(f"mlxq-{family_id}-{bits}-{mode}-{dtype}")
            model.save_pretrained(root / "dense")
            tiny_tokenizer(model.config.vocab_size).save_pretrained(root / "dense")
            config_file = root / "dense" / "config.json"
            config = json.loads(config_file.read_text())
            config_file.write_text(json.dumps({**legacy_rope_fields(config), **config}))
            mlx_convert(
                str(root / "dense"),
                str(root / "quantized"),
                quantize=True,
                q_bits=bits,
                q_mode=mode,
                dtype=dtype,
                quant_predicate=predicate,
            )
            out = None
            if convert:
                out, _ = convert_source(str(root / "quantized"), root / "precomputed")
            made[key] = (root / "quantized", out)
        return made[key]

    return folders


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits", MLX_BITS)
def test_dequantize_is_mx_dequantize_to_the_bit(bits, dtype):
    for group in (32, 64, 128):
        weight = (mx.random.normal((48, 256), key=mx.random.key(bits + group)) * 3).astype(dtype)
        packed, scales, biases = mx.quantize(weight, group, bits)
        expected = np.array(mx.dequantize(packed, scales, biases, group, bits).astype(mx.float32))
        tensors = {
            "weight": torch.from_numpy(np.array(packed).view(np.int32)).view(torch.uint32),
            "scales": torch.from_numpy(np.array(scales.astype(mx.float32))).to(
                {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}.get(dtype, torch.float32)
            ),
        }
        tensors["biases"] = torch.from_numpy(np.array(biases.astype(mx.float32))).to(
            tensors["scales"].dtype
        )
        got = dequantize({"quant_method": "mlx"}, "w", tensors, (48, 256))
        assert torch.equal(got, torch.from_numpy(expected)), (bits, group, dtype)


@pytest.mark.parametrize(("family_id", "bits"), CASES, ids=[f"{f}-{b}bit" for f, b in CASES])
def test_converted_runs_in_mlx_lm_as_the_quantized_original(family_id, bits, quantized):
    source, out = quantized(family_id, bits)
    original, tokenizer = mlx_lm.load(str(source))
    precomputed, _ = mlx_lm.load(str(out), trust_remote_code=True)
    expected, got = prompt_and_decode_logits(original), prompt_and_decode_logits(precomputed)
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        diff = float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())
        assert diff <= FLOAT16_ROUNDING, (step, diff)
        assert mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1))
    prompt = "w5 w17 w200 w3 w9"
    expected = mlx_lm.generate(original, tokenizer, prompt, max_tokens=12)
    assert mlx_lm.generate(precomputed, tokenizer, prompt, max_tokens=12) == expected
    # Every weight but layer 0's eliminated ones and the embedding: mlx's packing as stored.
    kept = dict(tree_flatten(precomputed.parameters()))
    quantized_kept = 0
    for name, value in tree_flatten(original.parameters()):
        if ".embed_" in name:
            continue
        if name not in kept:  # eliminated: layer 0's token-local modules only
            assert ".layers.0." in name or ".h.0." in name, name
            continue
        assert kept[name].dtype == value.dtype and mx.array_equal(kept[name], value), name
        quantized_kept += value.dtype == mx.uint32
    assert quantized_kept >= 4


@pytest.mark.parametrize("bits", [4, 8])
def test_serial_residual_block_is_the_quantized_embedding_as_stored(bits, quantized):
    """The residual block of a serial table is the embedding: kept in mlx's packing, byte for
    byte, so its lookup and the tied LM head are mlx-lm's own on the same bytes; the q/k/v block
    is 16-bit."""
    source, out = quantized("llama", bits)
    original, _ = mlx_lm.load(str(source))
    precomputed, _ = mlx_lm.load(str(out), trust_remote_code=True)
    embedding, table = original.model.embed_tokens, precomputed.model.embed_tokens
    assert type(table.residual).__name__ == "QuantizedEmbedding" and table.residual.bits == bits
    for part in ("weight", "scales", "biases"):
        assert mx.array_equal(getattr(table.residual, part), getattr(embedding, part)), part
    assert table.qkv.weight.dtype == mx.float16
    x = mx.random.normal((3, original.args.hidden_size)).astype(mx.float16)
    assert mx.array_equal(table.as_linear(x), embedding.as_linear(x))  # the tied LM head
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    assert record["table"]["residual_dtype"] == "mlx-quantized"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_qkv_block_is_layer_0_rounded_once(dtype, quantized):
    """The q/k/v block holds layer 0's q/k/v of the stored weights computed in float32 and rounded
    once to the stored dtype: within half a unit in its last place of the exact value (float64
    here), plus float32's own error bound for the norm and the product. mlx's CPU kernel is
    looser (its quantized product sums serially in the 16-bit dtype), which is why a bfloat16
    folder's greedy tokens can part from the original's on mlx's CPU (README, MLX)."""
    source, out = quantized("llama", 4, dtype=dtype)
    original, _ = mlx_lm.load(str(source))
    precomputed, _ = mlx_lm.load(str(out), trust_remote_code=True)
    layer, vocab = original.model.layers[0], original.args.vocab_size
    embedded = np.array(original.model.embed_tokens(mx.arange(vocab)).astype(mx.float32))
    x = embedded.astype(np.float64)
    norm = np.array(layer.input_layernorm.weight.astype(mx.float32)).astype(np.float64)
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + layer.input_layernorm.eps) * norm

    def weight(linear) -> np.ndarray:
        parts = (linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
        return np.array(mx.dequantize(*parts).astype(mx.float32)).astype(np.float64)

    attention = layer.self_attn
    weights = np.concatenate([weight(getattr(attention, f"{p}_proj")) for p in "qkv"])
    exact = normed @ weights.T
    table = precomputed.model.embed_tokens.qkv.weight
    assert table.dtype == getattr(mx, dtype)
    stored = np.array(table.astype(mx.float32)).astype(np.float64)
    mantissa = {"float16": 10, "bfloat16": 7}[dtype]
    half_unit = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 2.0**-14))) - mantissa - 1)
    # A float32 dot product of K terms is within K * 2^-24 of the sum of its terms' magnitudes
    # (the norm's own rounding, a few units, is inside the factor 4).
    float32_error = 4 * x.shape[-1] * 2.0**-24 * (np.abs(normed) @ np.abs(weights).T)
    assert np.all(np.abs(stored - exact) <= half_unit + float32_error)
    # And nearly everywhere the exact value rounded once (float32's error decides near ties).
    nearest = torch.from_numpy(exact).to(getattr(torch, dtype)).double().numpy()
    assert np.mean(stored == nearest) > 0.99


def test_record_and_config(quantized):
    _, out = quantized("llama", 4)
    config = json.loads((out / "config.json").read_text())
    record = config["firstlayer"]["quantization"]
    assert record["method"] == "mlx"
    assert "model.embed_tokens" in record["dequantized_into_the_table"]
    assert "model.layers.0.self_attn.q_proj" in record["dequantized_into_the_table"]
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"]["quant_method"] == "mlx"


def test_per_module_settings_of_layer_0_are_dropped(quantized):
    """A mixed recipe (layer 0 at 8 bits, the rest at 4): the converted config names no setting
    for a module the table replaced (mlx-lm would try to quantize it), and the folder runs."""

    def layer0_at_8_bits(path, module):
        return {"group_size": 64, "bits": 8, "mode": "affine"} if ".layers.0." in path else True

    source, out = quantized("llama", 4, predicate=layer0_at_8_bits)
    source_config = json.loads((source / "config.json").read_text())["quantization"]
    assert "model.layers.0.self_attn.q_proj" in source_config
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert not any(k.startswith("model.layers.0.self_attn.") and "o_proj" not in k for k in config)
    assert config["model.layers.0.mlp.up_proj"]["bits"] == 8  # kept modules keep theirs
    original, _ = mlx_lm.load(str(source))
    precomputed, _ = mlx_lm.load(str(out), trust_remote_code=True)
    a, b = original(mx.array(PROMPT)), precomputed(mx.array(PROMPT))
    assert float(mx.abs(a - b).max()) <= FLOAT16_ROUNDING


def test_transformers_refuses_the_converted_folder_by_name(quantized):
    from firstlayer.hf.loading import load, load_original

    source, out = quantized("llama", 4)
    with pytest.raises(FirstLayerError, match="mlx-lm quantized.*transformers and vLLM"):
        load(out)
    with pytest.raises(FirstLayerError, match="mlx-lm's own format"):
        load_original(str(source))  # what `firstlayer verify` compares with


@pytest.mark.parametrize("family_id", ["llama", "gpt_neox"])
def test_verify_rows_reads_the_quantized_source(family_id, quantized):
    from firstlayer.conversion.pipeline import check_folder_rows

    source, out = quantized(family_id, 4)
    assert check_folder_rows(source, out, count=32).passed


def test_other_modes_are_refused_by_name_leaving_nothing(quantized, tmp_path):
    source, _ = quantized("llama", 4, mode="mxfp4", convert=False)
    out = tmp_path / "out"
    with pytest.raises(FirstLayerError, match="mode 'mxfp4'"):
        convert_source(str(source), out)
    assert not out.exists()


def test_unknown_widths_are_refused_by_name_leaving_nothing(quantized, tmp_path):
    import shutil

    source, _ = quantized("llama", 4)
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization"]["model.layers.1.mlp.up_proj"] = {"group_size": 64, "bits": 7}
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(FirstLayerError, match=r"7-bit weights \(model.layers.1.mlp.up_proj"):
        convert_source(str(edited), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mlx_convert_quantizes_the_16_bit_block_of_a_converted_folder(quantized, tmp_path):
    """The q/k/v block stays 16-bit unless asked: `mlx_lm.convert -q` of the converted folder
    quantizes it like an embedding, and leaves what was quantized as it was."""
    _, out = quantized("llama", 4)
    mlx_convert(str(out), str(tmp_path / "q"), quantize=True, q_bits=8, trust_remote_code=True)
    model, tokenizer = mlx_lm.load(str(tmp_path / "q"), trust_remote_code=True)
    table = model.model.embed_tokens
    assert type(table.qkv).__name__ == "QuantizedEmbedding" and table.qkv.bits == 8
    assert table.residual.bits == 4
    assert mlx_lm.generate(model, tokenizer, "w5 w17", max_tokens=4)


def test_analyze_names_the_mlx_method(quantized):
    from firstlayer.analysis.quantization import quantization_of

    source, _ = quantized("llama", 4)
    config = json.loads((source / "config.json").read_text())
    with pytest.raises(FirstLayerError, match="quantized with 'mlx'"):
        quantization_of(config)
