"""Text in, text out: prompts (plain or chat-templated) through generate(), streamed or whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from firstlayer.errors import FirstLayerError


def encode_prompt(tokenizer: Any, prompt: str, chat: bool, context_length: int | None) -> dict:
    """Token ids for a prompt, through the chat template when `chat`; refuses over-long prompts."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise FirstLayerError("this model's tokenizer has no chat template: drop --chat")
        messages = [{"role": "user", "content": prompt}]
        batch = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        batch = tokenizer(prompt, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    if context_length is not None and length >= context_length:
        raise FirstLayerError(
            f"the prompt is {length} tokens, the model's context is {context_length}: "
            "shorten the prompt"
        )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    temperature: float = 0.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The model's continuation of `prompt`; `on_text` receives it piece by piece as it comes.

    temperature 0 is greedy decoding; otherwise sampling, reproducible with `seed`.
    """
    from transformers import TextStreamer

    if tokenizer is None:
        raise FirstLayerError("this model has no tokenizer: generate needs one to read the prompt")
    if max_new_tokens < 1:
        raise FirstLayerError("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise FirstLayerError("--temperature must be 0 (greedy) or more")
    batch = encode_prompt(tokenizer, prompt, chat, context_length(model))
    device = model.get_output_embeddings().weight.device  # a host-kept table is not
    batch = {k: v.to(device) for k, v in batch.items()}
    if seed is not None:
        torch.manual_seed(seed)
    sampling = (
        dict(do_sample=True, temperature=temperature)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    streamer = None
    if on_text is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: on_text(text)
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=model.generation_config.pad_token_id or tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
