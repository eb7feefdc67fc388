"""The class vLLM builds for each precomputed family, by the name a converted folder's
`architectures` gives (FirstLayer + the family's transformers class): vLLM's own class with the
plugin's mixin (`models` for causal LMs, `multimodal` for the image-text families), the
Transformers backend's, or one that refuses with the reason. vLLM's registry names them
"firstlayer.vllm.classes:<class>"; they are made on first use.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import (
    MULTIMODAL_TYPES,
    SUPPORTED_TYPES,
    VllmBackend,
    VllmNotServed,
    family_of,
)
from firstlayer.vllm.models import PrecomputedTransformersForCausalLM, PrecomputedVllmModel
from firstlayer.vllm.multimodal import PrecomputedMultimodal


def architecture(model_type: str) -> str:
    """The `architectures` entry of a converted folder of this family (as the transformers side
    writes it): FirstLayer + the family's transformers class, which is also vLLM's name for it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type in MULTIMODAL_TYPES:
        return f"FirstLayer{MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]}"
    return f"FirstLayer{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}"


@functools.cache
def vllm_model_class(model_type: str) -> type:
    """vLLM's class of the family, made precomputed."""
    from vllm.model_executor.models.registry import ModelRegistry

    family = family_of(model_type)
    route = family.vllm_route(model_type)
    if isinstance(route, VllmNotServed):
        return not_served_class(model_type)
    name = architecture(model_type).removeprefix("FirstLayer")
    # A family served through the Transformers backend goes there even where vLLM has a class of
    # its own whose layer 0 the plugin does not patch.
    backend = "TransformersMoEForCausalLM" if family.is_moe else "TransformersForCausalLM"
    is_backend = isinstance(route, VllmBackend)
    base = ModelRegistry._try_load_model_cls(backend if is_backend else name)
    if base is None:
        raise FirstLayerError(f"this vLLM has no model class {name} for {model_type}")
    attributes = {
        "model_type": model_type,
        "__module__": __name__,
        "__doc__": f"vLLM's {base.__name__} for {name}, its layer 0 run from a firstlayer table.",
    }
    if is_backend:
        mixin = PrecomputedTransformersForCausalLM
    elif model_type in MULTIMODAL_TYPES:
        mixin = PrecomputedMultimodal
    else:
        mixin = PrecomputedVllmModel
        attributes["family"] = route
    return type(f"FirstLayer{name}", (mixin, base), attributes)


class NotServed(nn.Module):
    """What vLLM builds for a precomputed family the plugin does not serve: one clear error."""

    model_type: str

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        served = ", ".join(served_families())
        route = family_of(self.model_type).vllm_route(self.model_type)
        reason = route.reason if isinstance(route, VllmNotServed) else "not yet"
        raise FirstLayerError(
            f"firstlayer's vLLM plugin does not serve {self.model_type} ({reason}); it serves "
            f"{served}. Run this folder with transformers (`import firstlayer`, then "
            "AutoModelForCausalLM.from_pretrained, AutoModelForImageTextToText for a multimodal "
            "folder)"
        )

    # What vLLM's inspection looks for in a text-generation model; never reached.
    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input_ids: Tensor, positions: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        raise NotImplementedError


def served_families() -> tuple[str, ...]:
    """The model types the plugin serves, through vLLM's own class or its Transformers backend."""
    return tuple(
        t for t in SUPPORTED_TYPES if not isinstance(family_of(t).vllm_route(t), VllmNotServed)
    )


@functools.cache
def not_served_class(model_type: str) -> type:
    return type(architecture(model_type), (NotServed,), {"model_type": model_type})


def __getattr__(name: str) -> type:
    """vLLM's registry names classes as "firstlayer.vllm.classes:<class>"; they are made here."""
    for model_type in (*SUPPORTED_TYPES, *MULTIMODAL_TYPES):
        if name == architecture(model_type):
            return vllm_model_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
