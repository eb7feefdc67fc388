"""Converted multimodal folders (LLaVA) in vLLM: image and text requests in one batch, several
images in one prompt, prefix caching on, give the original folder's tokens and logprobs; image
positions run layer 0's kept norm and q/k/v, token positions the table. Families the plugin does
not serve yet are refused by name. The venv imports vLLM's multimodal models (torchvision's CUDA
build beside the CPU torch)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import close, engine, rewrite_folder

from firstlayer.errors import FirstLayerError

IMAGE = 250
PER_IMAGE = 16  # a 32 x 32 image in 8 x 8 patches, the class token dropped
NEW_TOKENS = 8

# The transformers side's tiny multimodal configs, by path.
_spec = importlib.util.spec_from_file_location(
    "firstlayer_tests_multimodal", Path(__file__).parents[1] / "tests" / "test_multimodal.py"
)
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def processor():
    """A word tokenizer (t0 .. t255, `<image>` at IMAGE) and CLIP's image processor: vLLM
    expands each `<image>` into its placeholders."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocabulary = {f"t{i}": i for i in range(256) if i != IMAGE} | {"<image>": IMAGE}
    words = Tokenizer(models.WordLevel(vocabulary, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        unk_token="t0",
        bos_token="t1",
        eos_token="t2",
        pad_token="t0",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


# A chat's parts in order, an image as its placeholder (OpenAI's content format).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


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
        {"type": "text", "text": "t30 t31"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "t32"},
    ]
    return [{"role": "user", "content": content}]


def vision_under_vllm_names(tensors: dict) -> dict:
    """The CLIP tower's weights as vLLM's LLaVA loads them (`vision_tower.vision_model.*`, as
    llava-hf checkpoints store them; transformers 5.19 saves a built model's without it)."""
    renamed = {}
    for name, tensor in tensors.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = prefix + "vision_model." + name.removeprefix(prefix)
                break
        renamed[name] = tensor
    return renamed


@pytest.fixture(scope="module")
def llava(workdir):
    """The original LLaVA folder, its conversion, and the conversion with layer 0's kept q/k/v
    halved (image positions then differ, token positions not)."""
    from safetensors.torch import load_file, save_file

    from firstlayer.conversion import convert

    config = json.loads(json.dumps(tiny.CONFIGS["llava"]))
    config["text_config"].update(hidden_size=128, num_attention_heads=4)  # head size 32
    tiny.CONFIGS["llava"], saved = config, tiny.CONFIGS["llava"]
    try:
        model = tiny.build("llava")
    finally:
        tiny.CONFIGS["llava"] = saved
    parts = processor()
    original = workdir / "llava-original"
    model.save_pretrained(original)
    parts.save_pretrained(original)
    weights = original / "model.safetensors"
    save_file(vision_under_vllm_names(load_file(weights)), weights, metadata={"format": "pt"})
    precomputed = convert(model, workdir / "llava-precomputed", tokenizer=parts.tokenizer)
    parts.save_pretrained(precomputed)

    def rename_vision(tensors: dict, config: dict) -> None:
        renamed = vision_under_vllm_names(tensors)
        tensors.clear()
        tensors.update(renamed)

    rewrite_folder(precomputed, rename_vision)
    halved = workdir / "llava-halved-kept"
    shutil.copytree(precomputed, halved)

    def halve(tensors: dict, config: dict) -> None:
        for module in config["firstlayer"]["kept_layer0"]["modules"]:
            tensors[f"{module}.weight"] = tensors[f"{module}.weight"] * 0.5

    rewrite_folder(halved, halve)
    return original, precomputed, halved


def requests() -> list[dict]:
    """One image, two images, and text only, in one batch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    return [
        {"prompt": "t5 t9 <image> t7 t8", "multi_modal_data": {"image": images[0]}},
        {"prompt": "t11 <image> t12 <image> t13", "multi_modal_data": {"image": images}},
        {"prompt": "t20 t21 t22 t23"},
    ]


RUNS: dict[Path, list] = {}


def run(folder: Path) -> list[tuple[list[int], list[float], list[int]]]:
    """(tokens, logprobs, prompt ids) per request, the batch run twice on one engine with prefix
    caching on: the second pass reads the first's cached blocks."""
    from vllm import SamplingParams

    if folder not in RUNS:
        llm = engine(
            folder,
            skip_tokenizer_init=False,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"image": 2},
            max_num_batched_tokens=512,
        )
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        try:
            passes = [llm.generate(requests(), params, use_tqdm=False) for _ in range(2)]
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


def test_image_and_text_requests_give_the_original_tokens_and_logprobs(llava):
    original, precomputed, _ = llava
    expected, actual = run(original), run(precomputed)
    # The placeholders were expanded: 1 and 2 images of PER_IMAGE positions, then text only;
    # after the batch's second pass, the chat with one image.
    assert [p.count(IMAGE) for _, _, p in expected] == [PER_IMAGE, 2 * PER_IMAGE, 0] * 2 + [
        PER_IMAGE
    ]
    for (tokens, logprobs, _), (got_tokens, got_logprobs, _) in zip(expected, actual, strict=True):
        assert got_tokens == tokens
        assert max(abs(a - b) for a, b in zip(logprobs, got_logprobs, strict=True)) <= 1e-4


def test_image_positions_run_the_kept_layer0_and_token_positions_the_table(llava):
    """Halving the kept q/k/v changes every image request and no text-only one."""
    _, precomputed, halved = llava
    expected, actual = run(precomputed), run(halved)
    for i, ((_, logprobs, prompt), (_, got, _)) in enumerate(zip(expected, actual, strict=True)):
        difference = max(abs(a - b) for a, b in zip(logprobs, got, strict=True))
        if IMAGE in prompt:
            assert difference > 1e-3, i
        else:
            assert difference == 0, i


def test_prompt_embeddings_are_refused_at_config(llava):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(llava[1]), enable_prompt_embeds=True, skip_tokenizer_init=True)
    with pytest.raises(Exception, match="cannot take prompt embeddings"):
        args.create_engine_config()


def test_multimodal_families_not_served_yet_are_refused_by_name():
    from firstlayer.vllm.classes import vllm_model_class

    with pytest.raises(FirstLayerError, match="does not serve gemma3 .*LLaVA's only"):
        vllm_model_class("gemma3")(vllm_config=None)


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
