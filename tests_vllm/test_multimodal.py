"""Converted multimodal folders (Gemma 3, LLaVA, Mistral 3, Qwen2.5-VL) in vLLM: image and text
requests in one batch, several images in one prompt, prefix caching on, a chat with a data-URL
image (and that chat posted to vLLM's OpenAI server on LLaVA), give the original folder's tokens
and logprobs; image positions run layer 0's kept norm and q/k/v, token positions the table.
Families the plugin does not serve yet are refused by name. The venv imports vLLM's multimodal
models (torchvision's CUDA build beside the CPU torch)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import close, engine, rewrite_folder

from firstlayer.errors import FirstLayerError

NEW_TOKENS = 8


def from_tests(name: str):
    """A module of the transformers suite, by path: its tiny multimodal configs, its processors."""
    spec = importlib.util.spec_from_file_location(
        f"firstlayer_tests_{name}", Path(__file__).parents[1] / "tests" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = from_tests("test_multimodal")
processors = from_tests("multimodal_processors")
IMAGE = processors.IMAGE


@dataclass(frozen=True)
class Case:
    processor: Callable[[], Any]
    placeholder: str  # what a prompt writes for an image
    per_image: int  # IMAGE positions per image
    text_config: dict = field(default_factory=dict)  # at a head size vLLM's CPU attention takes
    extra: dict = field(default_factory=dict)  # more of the tiny config
    limits: dict = field(default_factory=lambda: {"image": 2})  # items per prompt


WIDE = dict(hidden_size=128, num_attention_heads=4)
CASES = {
    "gemma3": Case(processors.gemma_processor, "<start_of_image>", 4, WIDE),
    "llava": Case(processors.llava_processor, "<image>", 16, WIDE),
    "mistral3": Case(processors.pixtral_processor, "[IMG]", 4, dict(WIDE, head_dim=32)),
    "qwen2_5_vl": Case(
        processors.qwen_processor,
        processors.QWEN_IMAGE,
        16,
        dict(
            WIDE, rope_parameters=dict(rope_type="default", mrope_section=[4, 6, 6], rope_theta=1e4)
        ),
        extra=dict(
            vision_config=dict(tiny.CONFIGS["qwen2_5_vl"]["vision_config"], out_hidden_size=128)
        ),
        limits={"image": 2, "video": 0},
    ),
}


def vision_under_vllm_names(tensors: dict) -> dict:
    """A CLIP or SigLIP tower's weights as vLLM loads them (`vision_tower.vision_model.*`, as
    released checkpoints store them; transformers 5.19 saves a built model's without it)."""
    renamed = {}
    for name, tensor in tensors.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = prefix + "vision_model." + name.removeprefix(prefix)
                break
        renamed[name] = tensor
    return renamed


def rename_vision(tensors: dict, config: dict) -> None:
    renamed = vision_under_vllm_names(tensors)
    tensors.clear()
    tensors.update(renamed)


def halve_kept(tensors: dict, config: dict) -> None:
    for module in config["firstlayer"]["kept_layer0"]["modules"]:
        tensors[f"{module}.weight"] = tensors[f"{module}.weight"] * 0.5


@pytest.fixture(scope="module", params=list(CASES))
def folders(request, workdir):
    """A family's original folder, its conversion, and the conversion with layer 0's kept q/k/v
    halved (image positions then differ, token positions not)."""
    from safetensors.torch import load_file, save_file

    from firstlayer.conversion import convert

    model_type, case = request.param, CASES[request.param]
    config = json.loads(json.dumps(tiny.CONFIGS[model_type]))
    config["text_config"].update(case.text_config)
    config.update(case.extra)
    tiny.CONFIGS[model_type], saved = config, tiny.CONFIGS[model_type]
    try:
        model = tiny.build(model_type)
    finally:
        tiny.CONFIGS[model_type] = saved
    parts = case.processor()
    original = workdir / f"{model_type}-original"
    model.save_pretrained(original)
    parts.save_pretrained(original)
    precomputed = convert(model, workdir / f"{model_type}-precomputed", tokenizer=parts.tokenizer)
    parts.save_pretrained(precomputed)
    if model_type in ("gemma3", "llava"):  # CLIP's and SigLIP's towers under vLLM's names
        weights = original / "model.safetensors"
        save_file(vision_under_vllm_names(load_file(weights)), weights, metadata={"format": "pt"})
        rewrite_folder(precomputed, rename_vision)
    halved = workdir / f"{model_type}-halved-kept"
    shutil.copytree(precomputed, halved)
    rewrite_folder(halved, halve_kept)
    return case, original, precomputed, halved


# A text before every request, so that each fills whole cache blocks (BLOCK positions) that
# the batch's second pass finds cached, images included.
PREFIX = " ".join(f"t{3 + i % 7}" for i in range(30))
BLOCK = 32  # the smallest block vLLM's CPU attention takes


def requests(placeholder: str) -> list[dict]:
    """One image, two images, and text only, in one batch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    return [
        {"prompt": f"{PREFIX} t5 t9 {placeholder} t7 t8", "multi_modal_data": {"image": images[0]}},
        {
            "prompt": f"{PREFIX} t3 {placeholder} t4 {placeholder} t6",
            "multi_modal_data": {"image": images},
        },
        {"prompt": f"{PREFIX} t4 t5 t6 t7 t8"},
    ]


def chat_with_an_image() -> list[dict]:
    """An OpenAI chat message with an image as a base64 data URL, as a client sends it."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [
        {"type": "text", "text": "t3 t4"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "t5"},
    ]
    return [{"role": "user", "content": content}]


RUNS: dict[Path, list] = {}
HITS: dict[Path, int] = {}  # prefix-cache hits (positions) of the batch's second pass


def cache_hits(llm: Any) -> int:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def run(folder: Path, case: Case) -> list[tuple[list[int], list[float], list[int]]]:
    """(tokens, logprobs, prompt ids) per request, the batch run twice on one engine with prefix
    caching on: the second pass reads the first's cached blocks."""
    from vllm import SamplingParams

    if folder not in RUNS:
        llm = engine(
            folder,
            skip_tokenizer_init=False,
            enable_prefix_caching=True,
            block_size=BLOCK,
            disable_log_stats=False,
            limit_mm_per_prompt=case.limits,
            max_num_batched_tokens=512,
        )
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        try:
            passes = [llm.generate(requests(case.placeholder), params, use_tqdm=False)]
            before = cache_hits(llm)
            passes.append(llm.generate(requests(case.placeholder), params, use_tqdm=False))
            HITS[folder] = cache_hits(llm) - before
            # What vLLM's OpenAI server does with a chat: the same template and media loading.
            passes.append(llm.chat(chat_with_an_image(), params, use_tqdm=False))
        finally:
            close(llm)
        RUNS[folder] = [
            (
                list(o.outputs[0].token_ids),
                [
                    s[t].logprob
                    for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
                ],
                list(o.prompt_token_ids),
            )
            for outputs in passes
            for o in outputs
        ]
    return RUNS[folder]


def test_image_and_text_requests_give_the_original_tokens_and_logprobs(folders):
    case, original, precomputed, _ = folders
    expected, actual = run(original, case), run(precomputed, case)
    # The placeholders were expanded: 1 and 2 images, then text only; after the batch's second
    # pass, the chat with one image.
    per_image = case.per_image
    assert [p.count(IMAGE) for _, _, p in expected] == [per_image, 2 * per_image, 0] * 2 + [
        per_image
    ]
    # The second pass read whole blocks from the cache, on both sides.
    assert HITS[original] >= 3 * BLOCK and HITS[precomputed] == HITS[original]
    for (tokens, logprobs, _), (got_tokens, got_logprobs, _) in zip(expected, actual, strict=True):
        assert got_tokens == tokens
        assert max(abs(a - b) for a, b in zip(logprobs, got_logprobs, strict=True)) <= 1e-4


# benchmarks/vllm_server.py's api_server process (start, /health wait, stop), by path.
_spec = importlib.util.spec_from_file_location(
    "firstlayer_vllm_server", Path(__file__).parents[1] / "benchmarks" / "vllm_server.py"
)
vllm_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vllm_server)


@pytest.mark.parametrize("folders", ["llava"], indirect=True)
def test_the_openai_server_answers_a_chat_with_an_image_as_the_original(
    folders, workdir, monkeypatch
):
    """vLLM's OpenAI server on the converted folder answers a chat with a base64 data-URL image
    with the tokens and logprobs `LLM.chat` gives on the original folder (one server: the
    original's answer is the shared engine's)."""
    case, original, precomputed, _ = folders
    expected_tokens, expected_logprobs, expected_prompt = run(original, case)[-1]
    # The engine's threads on the suite's cores, as engine() binds them.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("TESTS_VLLM_CPUS", "0-1"))
    settings = ["--max-model-len", "256", "--kv-cache-memory-bytes", str(1 << 26)]
    settings += ["--max-num-seqs", "8", "--max-num-batched-tokens", "512"]
    settings += ["--limit-mm-per-prompt", json.dumps(case.limits)]
    server = vllm_server.Server(precomputed, workdir / "llava-server.log", *settings)
    try:
        # A folder the plugin refuses stops the server at start.
        assert server.ready(limit_s=300), server.log.read_text()[-3000:]
        status, text = vllm_server.call(
            server.port,
            "/v1/chat/completions",
            {
                "model": str(precomputed),
                "messages": chat_with_an_image(),
                "temperature": 0,
                "max_tokens": NEW_TOKENS,
                "ignore_eos": True,
                "logprobs": True,
                "return_token_ids": True,
            },
            timeout=120,
        )
    finally:
        server.stop()
    assert status == 200, text
    answer = json.loads(text)
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == expected_prompt  # the image's 16 placeholders included
    assert choice["token_ids"] == expected_tokens
    logprobs = [step["logprob"] for step in choice["logprobs"]["content"]]
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) <= 1e-4


def test_image_positions_run_the_kept_layer0_and_token_positions_the_table(folders):
    """Halving the kept q/k/v changes every image request and no text-only one."""
    case, _, precomputed, halved = folders
    expected, actual = run(precomputed, case), run(halved, case)
    for i, ((_, logprobs, prompt), (_, got, _)) in enumerate(zip(expected, actual, strict=True)):
        difference = max(abs(a - b) for a, b in zip(logprobs, got, strict=True))
        if IMAGE in prompt:
            assert difference > 1e-3, i
        else:
            assert difference == 0, i


def test_prompt_embeddings_are_refused_at_config(folders):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(folders[2]), enable_prompt_embeds=True, skip_tokenizer_init=True)
    with pytest.raises(Exception, match="cannot take prompt embeddings"):
        args.create_engine_config()


def test_multimodal_families_not_served_yet_are_refused_by_name():
    from firstlayer.vllm.classes import vllm_model_class

    for model_type in ("qwen3_vl", "idefics3"):
        with pytest.raises(FirstLayerError, match=f"does not serve {model_type} .*Qwen2.5-VL's"):
            vllm_model_class(model_type)(vllm_config=None)


def test_this_venv_imports_vllms_multimodal_models():
    """torchvision's CUDA build, beside the CPU torch, imports in a fresh interpreter (as vLLM's
    model inspection starts one), and so do vLLM's LLaVA and the processors it reads."""
    code = (
        "import torchvision.transforms.v2.functional, vllm.model_executor.models.llava; "
        "from transformers.models.pixtral.image_processing_pixtral import _num_image_tokens"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.ops.torchvision.nms is not None
