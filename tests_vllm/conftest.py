"""vLLM's side of the suite, run in its own virtual environment (.venv-vllm, see the Makefile).

Engines are the slow part (2 s in process, 25 s with two ranks, 20 s to compile): each model is
run once per configuration, for every prompt at once, and the tests compare the stored results.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

# Set before vLLM is imported: caches out of $HOME, engine core in this process, both cores.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The transformers-side fixtures (tiny models of every family, SmolLM2), by path: both suites
# have a conftest module.
_spec = importlib.util.spec_from_file_location(
    "firstlayer_tests_conftest", Path(__file__).parents[1] / "tests" / "conftest.py"
)
families = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = families
_spec.loader.exec_module(families)
Family = families.Family
smollm2 = families.smollm2  # the real SmolLM2, dequantised once per session (a fixture)


def build_tiny(family: Any, seed: int = 0) -> torch.nn.Module:
    """The transformers-side tiny model, built under an uncompiled vLLM config: once vLLM's
    Transformers backend has served a family it decorates transformers' classes in place
    (support_torch_compile), and building one of them then needs a current vLLM config. With
    compilation off the decorated model runs its plain forward."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config

    uncompiled = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    # The backend's decoration asks the model's config whether it could compile (rope scaling).
    uncompiled.model_config = SimpleNamespace(hf_config=family.config())
    with set_current_vllm_config(uncompiled):
        return families.build_tiny(family, seed)


# vLLM's CPU attention takes head sizes of 32 and up: the tiny configs are widened to 128.
WIDE = dict(hidden_size=128, num_attention_heads=4, initializer_range=0.3)


def widened(family: Any) -> Any:
    """A family's tiny test config at a head size vLLM's CPU attention takes (32)."""
    extra = dict(family.extra)
    if family.model_type == "gptj":
        extra.update(n_embd=128, n_head=4, initializer_range=0.3)
    else:
        extra.update(WIDE)
        if "head_dim" in family.extra:
            extra["head_dim"] = 32
    return Family(family.id, family.model_type, extra)


@dataclass(frozen=True)
class Run:
    """One engine configuration."""

    tensor_parallel_size: int = 1
    enforce_eager: bool = True


@dataclass(frozen=True)
class Result:
    tokens: list[list[int]]
    logprobs: list[list[float]]  # of each chosen token
    probed: Any = None  # what greedy's `probe` gave on the engine's model


def prompts(count: int = 6, vocab_size: int = 256, seed: int = 1) -> list[list[int]]:
    """Token id prompts of mixed lengths (3 to 17), one batch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (3, 1, 17, 8, 5, 12)[:count]
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="session", autouse=True)
def inspect_model_classes_in_this_process():
    """vLLM inspects every model class it has not seen before in a fresh interpreter, so that the
    caller's CUDA stays uninitialised: 6 to 10 s each here, for some 50 classes (every family's
    original and precomputed one). The engine core already runs in this process and there is no
    CUDA, so the suite runs vLLM's inspection here; test_a_fresh_interpreter_... keeps the
    subprocess route, the one `vllm serve` takes."""
    from vllm.model_executor.models import registry

    in_subprocess = registry._run_in_subprocess
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_run_in_subprocess", lambda inspect: inspect())
        yield in_subprocess  # vLLM's own, for the test of that route
    gc.unfreeze()  # after a refused engine, whose shutdown never ran (see engine())


def engine(folder: Path, run: Run = Run(), **overrides: Any):
    from vllm import LLM

    # vLLM collects garbage several times while it starts and stops an engine, each a pass over
    # this process's 750k objects (0.4 s): frozen, they are skipped. The engine's shutdown thaws
    # them again (vllm.v1.engine.core.EngineCore.shutdown) and collects.
    gc.collect()
    gc.freeze()

    # One rank on the cores TESTS_VLLM_CPUS names (`make test` gives it one, the main suite
    # running beside it), or one core per rank (the automatic binding refuses 2 ranks on this
    # single NUMA node).
    one_rank = os.environ.get("TESTS_VLLM_CPUS", "0-1")
    ranks = run.tensor_parallel_size * overrides.get("pipeline_parallel_size", 1)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1" if ranks == 2 else one_rank
    settings = dict(
        model=str(folder),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=1 << 26,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        skip_tokenizer_init=True,
        seed=0,
        tensor_parallel_size=run.tensor_parallel_size,
        enforce_eager=run.enforce_eager,
    )
    try:
        return LLM(**{**settings, **overrides})
    except BaseException:
        # An engine that fails to start in this process leaves its parallel groups behind, and
        # the next engine would reuse them (an MoE model's then lacks its expert group).
        from vllm.distributed import parallel_state

        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
        gc.unfreeze()
        raise


def close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()  # thaws and collects, see engine()
    del llm


def greedy(
    folder: Path,
    token_prompts: list[list[int]],
    run: Run = Run(),
    max_tokens=32,
    probe: Callable[[Any], Any] | None = None,
    **overrides,
) -> Result:
    """Greedy tokens and their logprobs for every prompt, in one batch; an engine runs each
    folder, configuration and batch once per session (tests compare the stored results).
    `probe(model)`, run on the same engine's model after generating (`LLM.apply_model`), gives
    `Result.probed`."""
    key = (folder, run, json.dumps(token_prompts), max_tokens, probe, json.dumps(overrides))
    if key not in RESULTS:
        RESULTS[key] = run_greedy(folder, token_prompts, run, max_tokens, probe, **overrides)
    return RESULTS[key]


RESULTS: dict[tuple, Result] = {}


def run_greedy(
    folder: Path, token_prompts: list[list[int]], run: Run, max_tokens, probe=None, **overrides
):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(folder, run, **overrides)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in token_prompts],
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0),
            use_tqdm=False,
        )
        probed = None if probe is None else llm.apply_model(probe)[0]
    finally:
        close(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [
        [step[token].logprob for step, token in zip(o.outputs[0].logprobs, t, strict=True)]
        for o, t in zip(outputs, tokens, strict=True)
    ]
    return Result(tokens, logprobs, probed)


def max_logprob_difference(a: Result, b: Result) -> float:
    return max(
        abs(x - y)
        for row_a, row_b in zip(a.logprobs, b.logprobs, strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    )


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


def original_and_converted(family: Any, root: Path) -> tuple[Path, Path]:
    """The tiny model saved as itself (what vLLM serves today) and converted by firstlayer."""
    from firstlayer.conversion import convert

    model = build_tiny(family)
    original = root / f"{family.id}-original"
    model.save_pretrained(original)
    return original, convert(model, root / f"{family.id}-precomputed")


def rewrite_folder(folder: Path, edit: Callable[[dict, dict], None]) -> None:
    """Rewrite a converted folder's weights and config.json in place, `edit(tensors, config)`,
    and re-record its file as `save_pretrained` would."""
    from safetensors.torch import load_file, save_file

    from firstlayer.folder import record_weight_files
    from firstlayer.hf import config_class

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    record_weight_files(folder, config_class(config["firstlayer"]["model_type"]).from_dict(config))


def dequantized_copy(folder: Path, out: Path) -> Path:
    """A converted folder with an int8 table, rewritten with that table dequantized into float32
    (the values the int8 lookup yields): the same model, read without scales."""
    from firstlayer.table.codec import column_segments, dequantize_int8
    from firstlayer.table.layout import SCALE_SUFFIX, TableLayout, segments

    def dequantized(tensors: dict, config: dict) -> None:
        record = config["firstlayer"]
        layout = TableLayout.from_dict(record["table"])
        for block in ("residual", "qkv"):
            name = f"{record['table']['module']}.{block}"
            if tensors[name].dtype == torch.int8:
                scales = tensors.pop(name + SCALE_SUFFIX)
                segment = column_segments(segments(layout, block))
                tensors[name] = dequantize_int8(tensors[name], scales, segment)
        record["table"].update(dtype="float32", residual_dtype="float32")
        record["format_version"] = 2

    shutil.copytree(folder, out)
    rewrite_folder(out, dequantized)
    return out
