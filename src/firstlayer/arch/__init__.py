"""Architecture adapters: the one place that knows Hugging Face module names."""

from __future__ import annotations

from firstlayer.arch import bloom, falcon, gpt_neox, gptj, llama, mpt, phi, phi3
from firstlayer.arch.base import Adapter, Parts
from firstlayer.families import refuse_not_supported

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
    """The adapter of a family, or a FirstLayerError saying why not (not applicable, or not
    supported yet, naming the supported ones)."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    refuse_not_supported(model_type)
    raise AssertionError(f"{model_type} is listed as supported in families but has no adapter")


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "Parts", "adapter_for"]
