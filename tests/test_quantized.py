"""Quantized checkpoints (compressed-tensors, fine-grained FP8, GPTQ, AWQ): converted out of core,
kept quantized, and loaded by transformers as the original is.

The checkpoints are written by `quantized_checkpoints.py` in each format's documented layout (a
tiny Llama, every decoder Linear quantized), with a reference dequantizer of its own per format.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import quantized_checkpoints as qc
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import firstlayer  # noqa: F401  (registers the precomputed classes)
from firstlayer.cli import main
from firstlayer.conversion import convert_checkpoint
from firstlayer.errors import FirstLayerError

FORMATS = list(qc.FORMATS)
LAYER0_QKV = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
# Formats whose schemes quantize a Linear's input too (per token, or by a stored scale).
INPUT_QUANTIZED = {
    "ct-w8a8-int8-dynamic": ("int", None),
    "ct-w8a8-int8-static": ("int", "input_scale"),
    "ct-fp8-dynamic": ("float", None),
    "ct-fp8-static": ("float", "input_scale"),
    "fp8-block": ("float", 128),
}


def write_source(root: Path, fmt: str) -> Path:
    dtype = qc.PREFERRED_DTYPE.get(fmt, "bfloat16")
    config, tensors, _ = qc.build(fmt, dtype)
    qc.write_folder(root / fmt, config, tensors)
    return root / fmt


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: write_source(root, fmt) for fmt in [*FORMATS, "dense"]}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {fmt: convert_checkpoint(path, root / fmt) for fmt, path in sources.items()}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_kept_tensor_is_copied_as_stored(fmt, sources, converted):
    before, after = tensors_of(sources[fmt]), tensors_of(converted[fmt])
    layer0 = tuple(f"{m}." for m in LAYER0_QKV)
    for name, tensor in before.items():
        if name.startswith(layer0):
            assert name not in after, name
            continue
        if name == "model.embed_tokens.weight":
            continue  # the table's first columns
        # Layer 0's attention norm moves beside the table (adapters of layer 0 read it).
        name_after = name.replace("model.layers.0.input_layernorm", "model.embed_tokens.attn_norm")
        assert after[name_after].dtype == tensor.dtype, name
        assert torch.equal(after[name_after].view(torch.uint8), tensor.view(torch.uint8)), name
    config = json.loads((converted[fmt] / "config.json").read_text())
    source_config = json.loads((sources[fmt] / "config.json").read_text())
    record = config["firstlayer"]["quantization"]
    assert record["dequantized_into_the_table"] == sorted(LAYER0_QKV)
    assert config["quantization_config"]["quant_method"] == record["method"]
    marked = config["quantization_config"]
    if record["method"] == "compressed-tensors":
        assert marked["ignore"] == ["lm_head", *sorted(LAYER0_QKV)]
    elif record["method"] in ("fp8", "awq"):
        assert marked["modules_to_not_convert"] == sorted(LAYER0_QKV)
    else:
        (rule,) = marked["dynamic"]
        assert rule.startswith("-:") and all(m.replace(".", r"\.") in rule for m in LAYER0_QKV)
    unchanged = {k: v for k, v in marked.items() if k not in ("ignore", "modules_to_not_convert")}
    source_quantization = source_config["quantization_config"]
    assert {k: v for k, v in unchanged.items() if k != "dynamic"} == {
        k: v
        for k, v in source_quantization.items()
        if k not in ("ignore", "modules_to_not_convert", "dynamic")
    }


def quantized_input(x: torch.Tensor, kind: str, how, scale_tensor) -> torch.Tensor:
    """The scheme's input quantization, as vLLM's kernels apply it, in float32: times the
    scale's reciprocal per token or by a stored scale, divided by it per group."""
    largest = 127.0 if kind == "int" else 448.0
    groups = x.unflatten(-1, (-1, how)) if isinstance(how, int) else x
    if how == "input_scale":
        scale = scale_tensor.float().reshape(())
    else:
        scale = (groups.abs().amax(-1, keepdim=True) / largest).clamp(min=1e-10)
    scaled = groups / scale if isinstance(how, int) else groups * scale.reciprocal()
    scaled = scaled.clamp(-largest - (kind == "int"), largest)
    codes = torch.round(scaled) if kind == "int" else scaled.to(torch.float8_e4m3fn).float()
    return (codes * scale).reshape(x.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_table_holds_layer_0_of_the_dequantized_weights(fmt, sources, tmp_path):
    """float32 table rows against layer 0 computed from the format's reference dequantizer:
    RMSNorm of the embedding, the dequantized weight; where the scheme quantizes inputs, the
    norm as the model runs it in its dtype and the input quantized as vLLM's kernels do."""
    out = convert_checkpoint(sources[fmt], tmp_path / "out", table_dtype="float32")
    config, tensors, dequantized = qc.build(fmt, qc.PREFERRED_DTYPE.get(fmt, "bfloat16"))
    dtype = tensors["model.embed_tokens.weight"].dtype
    x = tensors["model.embed_tokens.weight"].float()
    gain = tensors["model.layers.0.input_layernorm.weight"].float()
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])
    normed = normalized * gain
    # As the model runs its norm in its dtype: normalized in float32, rounded, times the gain.
    normed_as_run = (normalized.to(dtype) * gain.to(dtype)).float()
    expected = []
    for module in LAYER0_QKV:
        inputs = normed
        if fmt in INPUT_QUANTIZED:
            kind, how = INPUT_QUANTIZED[fmt]
            scale = tensors.get(f"{module}.input_scale")
            inputs = quantized_input(normed_as_run, kind, how, scale)
        expected.append(inputs @ dequantized[module].t())
    table = tensors_of(out)["model.embed_tokens.qkv"]
    torch.testing.assert_close(table, torch.cat(expected, -1), rtol=1e-5, atol=1e-5)


# transformers loads compressed-tensors with the compressed-tensors package, fine-grained FP8
# by dequantizing it on a CPU, GPTQ and AWQ only with gptqmodel (a GPU-oriented build, not
# installed here). compressed-tensors 0.20 with transformers 5.24 fails to load the asymmetric
# int4 original itself (its zero points), so it is compared elsewhere (vLLM, the rows above).
PROMPTS = torch.tensor([[1, 5, 77, 200, 13, 9, 250, 3], [1, 44, 3, 9, 120, 7, 66, 2]])


def load_both(sources, converted, fmt):
    original = AutoModelForCausalLM.from_pretrained(sources[fmt])
    precomputed = AutoModelForCausalLM.from_pretrained(converted[fmt])
    assert type(precomputed).__name__ == "FirstLayerLlamaForCausalLM"
    with torch.no_grad():
        expected = original(PROMPTS).logits.float()
        result = precomputed(PROMPTS).logits.float()
    return original, precomputed, (expected - result).abs().max()


@pytest.mark.parametrize("fmt", ["ct-w4a16-g32", "ct-w4a16-g128"])
def test_transformers_loads_a_weight_only_scheme_as_the_original(fmt, sources, converted):
    original, precomputed, diff = load_both(sources, converted, fmt)
    # bfloat16 models: the table's rows are computed in float32 where the original rounds
    # every step to bfloat16 (a dense model's conversion differs by as much).
    assert diff <= 0.1
    settings = dict(max_new_tokens=12, do_sample=False)
    greedy = original.generate(PROMPTS, **settings)
    assert torch.equal(greedy, precomputed.generate(PROMPTS, **settings))
    beams = dict(settings, num_beams=3)
    assert torch.equal(original.generate(PROMPTS, **beams), precomputed.generate(PROMPTS, **beams))


@pytest.mark.parametrize("fmt", ["ct-w8a8-int8-dynamic", "ct-fp8-dynamic", "fp8-block"])
def test_schemes_quantizing_inputs_say_transformers_runs_them_otherwise(fmt, sources, converted):
    """By default the table quantizes layer 0's inputs as vLLM's kernels do (tests_vllm: the
    original's tokens); transformers simulates them in bfloat16 (FP8 on a CPU: dequantized, no
    input quantization), so loading says so, and the logits differ by that quantization's
    size."""
    with pytest.warns(UserWarning, match="quantize its inputs as vLLM's int8 and FP8 kernels do"):
        _, _, diff = load_both(sources, converted, fmt)
    assert 0 < diff <= 0.3


@pytest.mark.parametrize(
    "fmt", ["ct-w8a8-int8-dynamic", "ct-w8a8-int8-static", "ct-fp8-dynamic", "fp8-block"]
)
def test_a_folder_quantized_for_transformers_is_the_original_there(fmt, sources, tmp_path):
    """`--quantized-for transformers`: layer 0's rows as transformers computes them (the
    simulated input quantization, FP8 dequantized, each product in bfloat16), so the logits
    are the original's, bit for bit; and vLLM refuses the folder (tests_vllm)."""
    out = convert_checkpoint(sources[fmt], tmp_path / "out", quantized_for="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "differs in transformers" warning
        original, precomputed, diff = load_both(sources, {fmt: out}, fmt)
    assert diff == 0
    settings = dict(max_new_tokens=12, do_sample=False)
    greedy = original.generate(PROMPTS, **settings)
    assert torch.equal(greedy, precomputed.generate(PROMPTS, **settings))
    beams = dict(settings, num_beams=3)
    assert torch.equal(original.generate(PROMPTS, **beams), precomputed.generate(PROMPTS, **beams))
    record = json.loads((out / "config.json").read_text())["firstlayer"]["quantization"]
    assert record["quantized_for"] == "transformers"


# --- bad input ---------------------------------------------------------------------------------


def edited(source: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "quantization, named",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "hqq"}, "compressed-tensors, fp8, gptq, awq"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3}, "3-bit"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "dynamic per-tensor"),
    ],
)
def test_a_method_or_variant_it_does_not_read_is_refused_by_name(
    quantization, named, sources, tmp_path, capsys
):
    fmt = "fp8-block" if quantization["quant_method"] == "fp8" else "gptq-g32"
    source = edited(sources[fmt], tmp_path, lambda c: c.update(quantization_config=quantization))
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out)]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_compressed_tensors_formats_it_does_not_read_are_refused(sources, tmp_path, capsys):
    def nvfp4(config):
        config["quantization_config"]["format"] = "nvfp4-pack-quantized"
        config["quantization_config"]["config_groups"]["group_0"]["format"] = None

    source = edited(sources["ct-w4a16-g32"], tmp_path, nvfp4)
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "nvfp4-pack-quantized" in capsys.readouterr().err


def test_dynamic_per_tensor_activations_are_refused(sources, tmp_path):
    """The whole batch's largest value sets the scale: layer 0 is no function of a token."""

    def per_tensor(config):
        group = config["quantization_config"]["config_groups"]["group_0"]
        group["input_activations"]["strategy"] = "tensor"

    source = edited(sources["ct-w8a8-int8-dynamic"], tmp_path, per_tensor)
    with pytest.raises(FirstLayerError, match="dynamic tensor activations"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_quantized_weight_without_its_scales_is_never_copied_as_plain(sources, tmp_path):
    """int8 weights whose config says nothing of quantization: refused, not read as floats."""
    source = edited(
        sources["ct-w8a8-int8-dynamic"], tmp_path, lambda c: c.pop("quantization_config")
    )
    with pytest.raises(FirstLayerError, match="without the scales"):
        convert_checkpoint(source, tmp_path / "out")


def test_another_dtype_is_refused(sources, tmp_path):
    with pytest.raises(FirstLayerError, match="leave out --dtype"):
        convert_checkpoint(sources["ct-w4a16-g32"], tmp_path / "out", dtype=torch.float32)
    assert not (tmp_path / "out").exists()


def test_verify_compares_with_the_original_as_transformers_loads_it(sources, converted, capsys):
    """The quantized original loaded by its quantizer in float32, the converted folder as it
    loads: within what the original itself loses in bfloat16; weights counted as `analyze`
    counts them (not compressed-tensors' int64 `weight_shape` beside each packed weight)."""
    fmt = "ct-w4a16-g32"
    assert main(["verify", str(sources[fmt]), str(converted[fmt]), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out
    assert "matches `analyze --accounting exact`: +32,768" in out
    assert "parameters           361,088 -> 393,856" in out  # qc's tiny Llama, by hand


@pytest.mark.parametrize("fmt", ["ct-w8a8-int8-dynamic", "ct-fp8-dynamic"])
def test_verify_passes_a_folder_quantized_for_transformers_and_fails_a_wrong_one(
    fmt, sources, tmp_path, capsys
):
    """A folder that is the original in transformers bit for bit passes: verify's layer-0
    baseline quantizes the inputs per token as the original does. The same folder with every
    q/k/v entry one bfloat16 step off fails."""
    from firstlayer.hf.loading import load, load_original
    from firstlayer.tools.verify import verify

    out = convert_checkpoint(sources[fmt], tmp_path / "out", quantized_for="transformers")
    assert main(["verify", str(sources[fmt]), str(out), "--max-new-tokens", "4"]) == 0
    assert "PASS" in capsys.readouterr().out

    original = load_original(str(sources[fmt])).model
    wrong = load(out, table_memory="host")
    with torch.no_grad():
        qkv = wrong.get_input_embeddings().qkv
        qkv.copy_(torch.nextafter(qkv, torch.full_like(qkv, torch.inf)))
    assert not verify(original, wrong, max_new_tokens=4).passed
