"""Decode speed in mlx-lm: the original folder against the precomputed one, in `firstlayer
bench`'s protocol (both loaded, a warm-up each, alternating runs, paired ratios, the analyser's
ceiling), next to the transformers loop on the same models.

A decode step is one greedy token for each of B sequences through mlx-lm's model call with its
own KV cache (`make_prompt_cache`), timed to `mx.eval` of the token; prefill is left out. mlx
runs on its default device: the CPU on Linux, the GPU on Apple silicon.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import torch
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model
from torch import nn

from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.hf.loading import save_source
from firstlayer.mlx.models import legacy_rope_fields
from firstlayer.tools.bench import PROMPT_ID_LIMIT, LabelledProgress, pair_of
from firstlayer.vllm.bench import EngineBenchResult, engine_result

TIMING = "a timer around each step's model call and mx.eval"


def save_original(model: nn.Module, folder: Path, tokenizer: Any = None) -> Path:
    """The source as a Hugging Face folder laid out as published: RoPE settings also under the
    top-level names mlx-lm reads (transformers 5 writes them under `rope_parameters` only)."""
    save_source(model, folder, tokenizer)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**legacy_rope_fields(config), **config}, indent=2))
    return folder


def time_decode_steps(model: Any, prompts: mx.array, new_tokens: int) -> float:
    """Prefill `prompts` (B, T), then time new_tokens - 1 greedy decode steps."""
    cache = make_prompt_cache(model)
    token = mx.argmax(model(prompts, cache=cache)[:, -1:], axis=-1)  # (B, 1)
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    return 1e3 * (time.perf_counter() - start) / (new_tokens - 1)


def bench_mlx(
    model: nn.Module,
    name: str = "model",
    batches: Sequence[int] = (1, 16),
    new_tokens: int = 64,
    prompt_tokens: int = 32,
    repeats: int = 7,
    progress: LabelledProgress | None = None,
) -> EngineBenchResult:
    """Time `model` and its precomputed twin in mlx-lm; both folders are written to a temporary
    directory (the original as published, the twin with firstlayer convert)."""
    if new_tokens < 3 or repeats < 1 or not batches or min(batches) < 1:
        raise FirstLayerError("bench --engine mlx needs --new-tokens >= 3, --repeats >= 1")
    generator = torch.Generator().manual_seed(0)
    prompts = {
        batch: mx.array(
            torch.randint(0, PROMPT_ID_LIMIT, (batch, prompt_tokens), generator=generator).numpy()
        )
        for batch in batches
    }
    total, done = len(batches) * repeats, 0
    decode = {}
    with tempfile.TemporaryDirectory(prefix="firstlayer-mlx-bench-") as tmp:
        folders = {"original": Path(tmp) / "original", "precomputed": Path(tmp) / "precomputed"}
        save_original(model, folders["original"])
        convert(model, folders["precomputed"])
        models = {
            key: load_model(folder, trust_remote_code=key == "precomputed")[0]
            for key, folder in folders.items()
        }
        for batch in batches:
            for mlx_model in models.values():  # warm-up, not counted
                time_decode_steps(mlx_model, prompts[batch], new_tokens)
            times: dict[str, list[float]] = {key: [] for key in models}
            for repeat in range(repeats):
                order = list(models) if repeat % 2 == 0 else list(models)[::-1]
                for key in order:
                    times[key].append(time_decode_steps(models[key], prompts[batch], new_tokens))
                done += 1
                if progress:
                    progress(f"{name} in mlx-lm: batch {batch}", done, total)
            decode[batch] = pair_of(times)
        del models
    engine = f"mlx-lm {mlx_lm.__version__} (mlx {mx.__version__}, {mx.default_device()})"
    return engine_result(
        model, name, decode, prompt_tokens, new_tokens, repeats, engine, False, TIMING
    )
