"""A multimodal model's decode step and image-prompt prefill, converted against its original.

A seeded random LLaVA (CLIP vision tower, 224 x 224 images in 14 x 14 patches: 256 image
positions per image) whose language model is CONFIG (a Llama config, e.g.
benchmarks/llama-shallow.json; norms perturbed, projector random) is precomputed in memory. Both
run `generate` on one prompt of text around one image, greedy, with the tokens checked equal,
in alternating order after a warm-up: prefill = a 1-token generate, decode ms/step = (an
(N + 1)-token generate - the prefill) / N. Paired ratios original / precomputed with their
intervals, beside `analyze`'s decode and prefill ceilings for CONFIG, and the share of the
prompt's positions that read the table.

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multimodal.py \\
        benchmarks/llama-shallow.json --repeats 11
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from firstlayer import precompute
from firstlayer.analysis.savings import analyze
from firstlayer.tools.bench import Ratio

IMAGE_TOKENS = (224 // 14) ** 2
TEXT_TOKENS = 32
NEW_TOKENS = 32


def build(text: dict):
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(
        model_type="clip_vision_model",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        projection_dim=256,
    )
    image_token = text["vocab_size"] - 1
    config = AutoConfig.for_model(
        "llava",
        text_config=text,
        vision_config=vision,
        image_token_index=image_token,
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "multi_modal_projector" in name:
                parameter.copy_(0.05 * torch.randn_like(parameter))
            elif parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model, image_token


@torch.inference_mode()
def timed(model, inputs: dict, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    tokens = model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    text = json.loads(Path(args.config).read_text())
    original, image_token = build(text)
    models = {"original": original, "precomputed": precompute(copy.deepcopy(original))}
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(3, image_token, (TEXT_TOKENS,), generator=generator).tolist()
    ids = words[:8] + [image_token] * IMAGE_TOKENS + words[8:]
    inputs = {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(1, 3, 224, 224, generator=generator),
    }
    for model in models.values():  # warm-up
        timed(model, inputs, 2)
    expected = timed(original, inputs, NEW_TOKENS)[1]
    assert torch.equal(expected, timed(models["precomputed"], inputs, NEW_TOKENS)[1])
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for run in range(args.repeats):
        for name in names if run % 2 == 0 else names[::-1]:
            first = timed(models[name], inputs, 1)[0]
            whole = timed(models[name], inputs, NEW_TOKENS + 1)[0]
            prefill[name].append(1e3 * first)
            decode[name].append(1e3 * (whole - first) / NEW_TOKENS)
    analysis = analyze(text)
    share = TEXT_TOKENS / len(ids)
    print(
        f"{args.config} as a LLaVA language model, {torch.get_num_threads()} thread(s), "
        f"{args.repeats} pairs; prompt {len(ids)} positions, {TEXT_TOKENS} of them tokens "
        f"({share:.1%} read the table), {IMAGE_TOKENS} image positions"
    )
    for label, times, ceiling in (
        ("decode ms/step", decode, analysis.decode_ceiling(1)),
        ("image-prompt prefill ms", prefill, analysis.prefill_ceiling(1)),
    ):
        spread = ", ".join(
            f"{name} {statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"
            for name, v in times.items()
        )
        ratio = Ratio.of(
            [a / b for a, b in zip(times["original"], times["precomputed"], strict=True)]
        )
        print(
            f"{label}: {spread}; original / precomputed {ratio.median:.3f}x "
            f"[{ratio.low:.3f}-{ratio.high:.3f}] ({ratio.confidence:.0%} interval), "
            f"ceiling {ceiling:.3f}x (text only)"
        )


if __name__ == "__main__":
    main()
