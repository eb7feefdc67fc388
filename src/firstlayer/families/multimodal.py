"""Multimodal checkpoints (Gemma 3, LLaVA, Mistral 3, Qwen2.5-VL, Qwen3-VL): a vision tower and a
projector beside a language model of a family declared here, under `model.language_model`.

The wrapper embeds the prompt's ids with the language model's embedding, scatters the image
features into the image placeholders and calls the language model with inputs_embeds. Token
positions read the table; image positions go through layer 0's kept norm and q/k/v
(`hf.patch.KeptLayer0`), which every multimodal folder keeps. The vision tower and the
projector are kept as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from firstlayer.errors import FirstLayerError
from firstlayer.families.base import (
    REGISTRY,
    Family,
    Parts,
    VllmNotServed,
    VllmOwnClass,
    VllmRoute,
)

if TYPE_CHECKING:
    from torch import nn

LANGUAGE_MODEL = "model.language_model"
# Where a wrapper keeps its language model under another name.
LANGUAGE_MODELS = {"idefics3": "model.text_model"}
# Text model types whose declaration is another's: Qwen2.5-VL's text model has Qwen 2's layer.
TEXT_FAMILIES = {"qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}
# The language model's type where a config.json does not name it: Gemma 3's text_config, and
# older Qwen2.5-VL files, which keep the language model at the top level.
TEXT_TYPES = {
    "gemma3": "gemma3_text",
    "qwen2_5_vl": "qwen2_5_vl_text",
    "qwen3_vl": "qwen3_vl_text",
}


class LanguageModel:
    """A multimodal model seen as the causal LM its text family's declaration reads: `model.*`
    names the language model's modules, `lm_head` the top model's head, `config` the text
    config."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config.get_text_config()
        # A precomputed config's model type is firstlayer's; its family's is the source's.
        model_type = getattr(model.config, "source_model_type", model.config.model_type)
        self.prefix = LANGUAGE_MODELS.get(model_type, LANGUAGE_MODEL)

    def get_submodule(self, name: str) -> nn.Module:
        return self.model.get_submodule(self.own_name(name))

    def own_name(self, name: str) -> str:
        """A causal LM's module name as the multimodal model names it."""
        if name == "model" or name.startswith("model."):
            return self.prefix + name.removeprefix("model")
        return name


def renamed(parts: Parts, rename: Callable[[str], str]) -> Parts:
    """The same parts under other module names."""

    def one(name: str | None) -> str | None:
        return None if name is None else rename(name)

    return dataclasses.replace(
        parts,
        embedding=rename(parts.embedding),
        attn_norm=one(parts.attn_norm),
        projections=tuple(rename(p) for p in parts.projections),
        head_norms={rename(k): rename(v) for k, v in parts.head_norms.items()},
        run_head_norms={rename(k): rename(v) for k, v in parts.run_head_norms.items()},
        lm_head=rename(parts.lm_head),
        mlp_norm=one(parts.mlp_norm),
        mlp=one(parts.mlp),
        embedding_norm=one(parts.embedding_norm),
    )


class Multimodal(Family):
    """An image-text-to-text model whose language model is of a declared family."""

    model_types: ClassVar[tuple[str, ...]] = (
        "gemma3",
        "llava",
        "mistral3",
        "qwen2_5_vl",
        "qwen3_vl",
        "idefics3",
    )
    is_multimodal = True
    notes = "vision tower and projector kept; image positions run layer 0's kept norm and q/k/v"
    defaults: ClassVar[dict[str, dict[str, Any]]] = {t: {} for t in model_types}
    vllm = VllmNotServed(
        "of the multimodal folders it serves Gemma 3's, LLaVA's, Mistral 3's and Qwen2.5-VL's "
        "only, for now"
    )
    # vLLM's own wrapper class, its language model's layer 0 patched (`vllm.multimodal`).
    vllm_by_type: ClassVar[Mapping[str, VllmRoute]] = dict.fromkeys(
        ("gemma3", "llava", "mistral3", "qwen2_5_vl"), VllmOwnClass()
    )

    def text_config(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """A multimodal config.json's language model as a config of its own, under the model
        type of its declared family (older Qwen2.5-VL files keep it at the top level)."""
        t = cfg["model_type"]
        text = dict(
            cfg.get("text_config") or {k: v for k, v in cfg.items() if k != "vision_config"}
        )
        text_type = text.get("model_type") if "text_config" in cfg else None
        text_type = text_type or TEXT_TYPES.get(t)
        if text_type is None:
            raise FirstLayerError(f"the {t} config's text_config names no model_type: add it")
        if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
        return {**text, "model_type": TEXT_FAMILIES.get(text_type, text_type)}

    def text_family(self, model: nn.Module) -> Family:
        text_type = model.config.get_text_config().model_type
        text_type = TEXT_FAMILIES.get(text_type, text_type)
        family = REGISTRY.get(text_type)
        if family is None or family.is_parallel(model.config.get_text_config().to_dict()):
            raise FirstLayerError(
                f"a {model.config.model_type} model whose language model is {text_type}: "
                "multimodal models are converted where their language model is a serial family "
                "firstlayer declares"
            )
        return family

    def parts(self, model: nn.Module) -> Parts:
        language_model = LanguageModel(model)
        parts = self.text_family(model).parts(language_model)
        return renamed(parts, language_model.own_name)


MULTIMODAL: dict[str, Multimodal] = dict.fromkeys(Multimodal.model_types, Multimodal())
