"""Architecture adapters: the one place that knows Hugging Face module names."""

from __future__ import annotations

from firstlayer.arch import bloom, falcon, gpt_neox, gptj, llama, mpt, phi, phi3
from firstlayer.arch.base import Adapter, Parts
from firstlayer.errors import FirstLayerError

ADAPTERS: tuple[Adapter, ...] = (
    llama.ADAPTER,
    phi3.ADAPTER,
    gpt_neox.ADAPTER,
    gptj.ADAPTER,
    phi.ADAPTER,
    falcon.ADAPTER,
    bloom.ADAPTER,
    mpt.ADAPTER,
)

SUPPORTED = tuple(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a family, or a FirstLayerError naming the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise FirstLayerError(
        f"model type {model_type!r} is not supported by the converter; supported: "
        f"{', '.join(SUPPORTED)} (`firstlayer analyze` still estimates its savings)"
    )


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "Parts", "adapter_for"]
