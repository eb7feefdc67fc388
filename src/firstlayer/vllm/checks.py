"""What a precomputed model refuses in an engine's configuration, before the engine starts.

vLLM runs a per-architecture hook on every `VllmConfig` it builds (`MODELS_CONFIG_MAP`, the
table its own Gemma 3, Qwen3-Next or Mamba classes use to adjust a config): in the process that
creates the engine, before any engine process or worker starts. A refusal there reaches the
caller of `LLM(...)` or `vllm serve` as itself (inside pydantic's ValidationError, whose message
carries it), within seconds, instead of an "Engine core initialization failed" after the workers
started. The model classes run the same checks in their `__init__`, for a vLLM without the hook.
"""

from __future__ import annotations

from typing import Any

from firstlayer.errors import FirstLayerError
from firstlayer.families import MULTIMODAL_TYPES, VllmBackend, family_of
from firstlayer.table.layout import TableLayout
from firstlayer.vllm.quantized import refuse_unrecorded_quantization

# Speculative methods that never touch the target's input embedding or layer 0: a precomputed
# target gives the original's tokens with them (measured for draft_model; ngram and suffix
# decoding read token ids only).
TARGET_SPECULATION = ("draft_model", "ngram", "ngram_gpu", "suffix")


def refuse_prompt_embeds(vllm_config: Any) -> None:
    """A precomputed model has no layer 0 for an embedding to enter: its first rows come from the
    table, by token id. With prompt embeddings enabled vLLM also feeds every token prompt through
    `embed_input_ids` into a buffer of the model's hidden size, so no request could run."""
    if vllm_config.model_config.enable_prompt_embeds:
        raise FirstLayerError(
            "a precomputed model looks layer 0 up by token id and cannot take prompt embeddings "
            "(its table replaced the input embedding): serve it without enable_prompt_embeds "
            "(--enable-prompt-embeds), or serve the original model for embedding prompts"
        )


def refuse_speculation_through_the_embedding(vllm_config: Any) -> None:
    """EAGLE, MTP and similar drafts share the target's input embedding, which in a precomputed
    target returns table rows, not embeddings; other methods are not measured."""
    speculative = vllm_config.speculative_config
    if speculative is None or speculative.method in TARGET_SPECULATION:
        return
    raise FirstLayerError(
        f"speculative decoding with method {speculative.method!r} is not served on a precomputed "
        "target: EAGLE and MTP drafts share the target's input embedding, which its table "
        f"replaced, and other methods are not measured; use one of {', '.join(TARGET_SPECULATION)}"
        " (a precomputed draft model works), or serve the original target"
    )


def refuse_layer_0_off_the_first_stage(vllm_config: Any) -> None:
    """Token ids enter the pipeline at the first stage, so the table (layer 0) must sit there: a
    partition that gives the first stage no layer would hand layer 0 x, not its rows."""
    from vllm.distributed.utils import get_pp_indices

    stages = vllm_config.parallel_config.pipeline_parallel_size
    if stages == 1:
        return
    layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    start, stop = get_pp_indices(layers, 0, stages)
    if stop == start:
        raise FirstLayerError(
            "firstlayer's table feeds layer 0 from the first pipeline stage's embedding, and this "
            "partition gives the first stage no layer: give it at least one "
            "(VLLM_PP_LAYER_PARTITION)"
        )


def refuse_ranks_on_the_backend_route(vllm_config: Any, model_type: str) -> None:
    if not isinstance(family_of(model_type).vllm_route(model_type), VllmBackend):
        return
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        raise FirstLayerError(
            f"vLLM serves {model_type} through its Transformers backend, where firstlayer's "
            "table runs on one rank only: use tensor_parallel_size=1"
        )


def check_engine(vllm_config: Any) -> None:
    """Everything a precomputed model refuses in an engine configuration, by name."""
    record = vllm_config.model_config.hf_config.firstlayer
    refuse_prompt_embeds(vllm_config)
    refuse_speculation_through_the_embedding(vllm_config)
    refuse_layer_0_off_the_first_stage(vllm_config)
    refuse_ranks_on_the_backend_route(vllm_config, record["model_type"])
    refuse_unrecorded_quantization(vllm_config.model_config.hf_config)


def widen_inputs_embeds(model_config: Any) -> None:
    """The runner's embeddings buffer as wide as a table row, `[x | q k v]`: vLLM sizes it by the
    text config's `projection_dim` or `projection_size`, else its hidden size."""
    record = model_config.hf_config.firstlayer
    text = model_config.hf_text_config
    if getattr(text, "projection_dim", None) is not None:
        raise FirstLayerError(
            "this multimodal folder's text config has a projection_dim, which vLLM would take as "
            "the width of its embeddings: firstlayer's plugin cannot serve it"
        )
    text.projection_size = TableLayout.from_dict(record["table"]).width


class EngineChecks:
    """vLLM's `VerifyAndUpdateConfig` for every precomputed architecture (duck-typed: the
    protocol is two static methods)."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        record = model_config.hf_config.firstlayer
        if record["model_type"] in MULTIMODAL_TYPES:
            widen_inputs_embeds(model_config)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        check_engine(vllm_config)


def register_engine_checks(architectures: list[str]) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for name in architectures:
        MODELS_CONFIG_MAP.setdefault(name, EngineChecks)
