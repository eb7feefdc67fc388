"""Multimodal checkpoints (Gemma 3, LLaVA, Mistral 3 with Pixtral, Qwen2.5-VL): converted with
the vision tower, the projector and the processor files kept, exact with images in transformers.
Token positions read the table, image positions run layer 0's kept norm and q/k/v, decode steps
run no kept projection."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from firstlayer import precompute
from firstlayer.cli import main
from firstlayer.conversion import convert_source
from firstlayer.conversion import pipeline as pipeline_module

IMAGE = 250  # every tiny model's image token id
TEXT = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=96,
    vocab_size=256,
    max_position_embeddings=512,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
CONFIGS = {
    "gemma3": dict(
        text_config=dict(TEXT, model_type="gemma3_text", head_dim=32, sliding_window=4),
        vision_config=dict(VISION, model_type="siglip_vision_model"),
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=251,
        eoi_token_index=252,
    ),
    "llava": dict(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
        image_token_index=IMAGE,
        vision_feature_layer=-1,
    ),
    "mistral3": dict(
        text_config=dict(TEXT, model_type="mistral", head_dim=16),
        vision_config=dict(VISION, model_type="pixtral", head_dim=16),
        image_token_index=IMAGE,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    ),
    "qwen2_5_vl": dict(
        text_config=dict(
            TEXT,
            model_type="qwen2_5_vl_text",
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            window_size=16,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
    ),
    # The language model under `text_model`, images as (batch, images, 3, H, W).
    "idefics3": dict(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(VISION),
        image_token_id=IMAGE,
        scale_factor=2,
    ),
    # Deepstack: visual features added after layer 0 (not before it), q/k norms at run time.
    "qwen3_vl": dict(
        text_config=dict(
            TEXT,
            model_type="qwen3_vl_text",
            head_dim=16,
            rope_parameters=dict(
                rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4, mrope_interleaved=True
            ),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=251,
        vision_start_token_id=252,
        vision_end_token_id=253,
    ),
}
# Image placeholder tokens per image, as each tiny vision tower and projector make them.
TOKENS_PER_IMAGE = {
    "gemma3": 4,
    "llava": 16,
    "mistral3": 4,
    "qwen2_5_vl": 4,
    "qwen3_vl": 4,
    "idefics3": 4,
}
NEW_TOKENS = 6


def build(model_type: str, seed: int = 0):
    """A seeded float32 model; norms perturbed and the projector randomised (Gemma 3's starts at
    zero, and image positions would then prove nothing)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "multi_modal_projector" in name:
                parameter.copy_(0.2 * torch.randn_like(parameter))
            elif parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def prompt(model_type: str, images: int, seed: int = 1) -> dict:
    """Text around `images` images: ids with their placeholders and the pixel inputs."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 240, (3 * (images + 1),), generator=generator).tolist()
    per_image = TOKENS_PER_IMAGE[model_type]
    ids = text[:3]
    for i in range(images):
        ids += [IMAGE] * per_image + text[3 * (i + 1) : 3 * (i + 2)]
    inputs: dict = {"input_ids": torch.tensor([ids])}
    if images == 0:
        return inputs
    if model_type.startswith("qwen"):  # 4 x 4 patches of 4 x 4 pixels, 2 frames, merged 2 x 2
        pixels = torch.randn(16 * images, 3 * 2 * 4 * 4, generator=generator)
        inputs |= {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]] * images)}
    elif model_type == "idefics3":
        inputs["pixel_values"] = torch.randn(1, images, 3, 32, 32, generator=generator)
    else:
        inputs["pixel_values"] = torch.randn(images, 3, 32, 32, generator=generator)
    if model_type == "qwen3_vl":  # M-RoPE positions from the placeholders' types
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    if model_type == "mistral3":
        inputs["image_sizes"] = torch.tensor([[32, 32]] * images)
    return inputs


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    original = build(request.param)
    return request.param, original, precompute(copy.deepcopy(original))


def assert_close(expected: torch.Tensor, actual: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    assert (expected - actual).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("images", [1, 2, 0])
def test_prompts_with_images_give_the_original_logits_and_tokens(pair, images):
    model_type, original, model = pair
    inputs = prompt(model_type, images)
    with torch.inference_mode():
        assert_close(original(**inputs).logits, model(**inputs).logits)
        for settings in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
            common = dict(inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **settings)
            assert torch.equal(original.generate(**common), model.generate(**common))


def test_image_positions_run_the_kept_layer0_and_decode_steps_none(pair):
    model_type, original, model = pair
    calls = []
    norm = model.get_input_embeddings().attn_norm
    handle = norm.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    inputs = prompt(model_type, images=2)
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        handle.remove()
    # One call, the prefill's, on exactly the image positions.
    assert calls == [2 * TOKENS_PER_IMAGE[model_type]]


PROCESSOR_FILES = {
    "preprocessor_config.json": '{"image_processor_type": "tiny"}\n',
    "chat_template.jinja": "{{ messages }}\n",
}


@pytest.fixture(scope="module")
def converted(pair, tmp_path_factory):
    model_type, original, _ = pair
    folder = tmp_path_factory.mktemp(model_type)
    original.save_pretrained(folder / "source")
    for name, text in PROCESSOR_FILES.items():
        (folder / "source" / name).write_text(text)
    out, how = convert_source(str(folder / "source"), folder / "out")
    assert how == "out of core"
    return folder / "source", out


def test_a_converted_folder_keeps_vision_projector_and_processor_files(pair, converted):
    model_type, original, _ = pair
    source, out = converted
    record = json.loads((out / "config.json").read_text())["firstlayer"]
    kept = set(record["kept_layer0"]["modules"])
    language_model = "model.text_model" if model_type == "idefics3" else "model.language_model"
    assert kept == {f"{language_model}.layers.0.self_attn.{p}_proj" for p in "qkv"}
    # Every weight outside the language model, and layer 0's q/k/v, as the original has them.
    with safe_open(out / "model.safetensors", "pt") as after:
        names = set(after.keys())
        for name, tensor in original.state_dict().items():
            vision = name.startswith("model.") and not name.startswith(language_model + ".")
            if vision or name.rpartition(".")[0] in kept:
                assert torch.equal(tensor, after.get_tensor(name)), name
    vision_towers = ("model.vision_tower.", "model.visual.", "model.vision_model.")
    assert any(n.startswith(vision_towers) for n in names)
    for name, text in PROCESSOR_FILES.items():
        assert (out / name).read_text() == text


def test_a_converted_folder_loads_with_the_auto_class_and_its_own(pair, converted):
    from transformers import AutoModelForImageTextToText

    from firstlayer.hf.models import model_class

    model_type, original, _ = pair
    _, out = converted
    inputs = prompt(model_type, images=2, seed=2)
    with torch.inference_mode():
        expected = original(**inputs).logits
        for loader in (AutoModelForImageTextToText, model_class(model_type)):
            loaded = loader.from_pretrained(out)
            assert type(loaded).__name__.startswith("FirstLayer")
            assert_close(expected, loaded(**inputs).logits)


def test_cli_convert_verify_and_analyze_a_multimodal_checkpoint(tmp_path, capsys):
    source = tmp_path / "source"
    build("gemma3").save_pretrained(source)
    assert main(["convert", str(source), str(tmp_path / "out")]) == 0
    assert "q/k/v kept for embedding inputs" in capsys.readouterr().out
    assert main(["verify", str(source), str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"]
    assert report["params_after"] - report["params_before"] == report["predicted_param_change"]
    assert main(["analyze", str(source / "config.json"), "--json"]) == 0
    assert capsys.readouterr().out


@pytest.mark.parametrize("model_type", ["gemma3", "llava", "mistral3", "qwen2_5_vl"])
def test_pipeline_image_text_to_text_answers_as_the_original(model_type, tmp_path):
    """transformers' pipeline on a converted folder with the family's processor (a word tokenizer
    and a 32 x 32 image processor, tests/multimodal_processors.py) answers a chat with an image
    as on the original folder."""
    import numpy as np
    from multimodal_processors import PROCESSORS
    from PIL import Image
    from transformers import pipeline

    if model_type in ("mistral3", "qwen2_5_vl"):
        # transformers builds Pixtral's processor and Qwen2.5-VL's video processor on
        # torchvision: they run in .venv-vllm (the oldest-end suite), which has it.
        pytest.importorskip("torchvision", reason=f"{model_type}'s processor needs torchvision")
    source = tmp_path / "source"
    build(model_type).save_pretrained(source)
    PROCESSORS[model_type]().save_pretrained(source)
    out, _ = convert_source(str(source), tmp_path / "out")
    copied = [n for n in pipeline_module.PROCESSOR_FILES if (source / n).is_file()]
    assert copied and all((out / n).read_bytes() == (source / n).read_bytes() for n in copied)
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")
    content = [{"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "t5"}]
    messages = [{"role": "user", "content": content}]
    answers = []
    for folder in (source, out):
        runner = pipeline("image-text-to-text", model=str(folder))
        generated = runner(text=messages, max_new_tokens=NEW_TOKENS, return_full_text=False)
        answers.append((type(runner.model).__name__, generated[0]["generated_text"]))
    assert answers[1][0] == "FirstLayer" + answers[0][0]
    assert answers[1][1] == answers[0][1] and answers[0][1].strip()


def test_analyze_reads_a_multimodal_config_as_it_is_and_counts_the_kept_weights():
    """A config.json as released: Qwen2.5-VL's older files keep the language model at the top
    level, newer ones (and Gemma 3's) under text_config. Nothing of layer 0 leaves the model: the
    table adds to it."""
    from firstlayer.analysis.savings import analyze

    text = dict(TEXT, num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
    vision = {"depth": 1, "hidden_size": 32}
    for config in (
        {"model_type": "qwen2_5_vl", **text, "vision_config": vision},
        {"model_type": "qwen2_5_vl", "text_config": text, "vision_config": vision},
    ):
        analysis = analyze(config, accounting="exact")
        assert (analysis.dims.model_type, analysis.dims.keeps_layer0) == ("qwen2", True)
        assert analysis.memory.decrease == 0
        assert analysis.memory.net == analysis.memory.increase == 256 * (64 + 2 * 32)
