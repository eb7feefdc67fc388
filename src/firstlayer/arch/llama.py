"""Llama and every family that keeps its module names (`model.layers.N.self_attn.q_proj`, ...).

Most decoders since Llama 2 are this adapter: what differs between them is found by name.
The attention norm is `input_layernorm` (`attention_layernorm` in Apertus; none in OLMo 2/3 and
EXAONE 4, which norm only after attention). Per-head q/k norms (Qwen3, Gemma 3, OLMoE's
full-width ones, Cohere's, StableLM's per-head LayerNorms) are token-local and folded in.
Parallel blocks (Cohere, StableLM by config) feed `mlp` the same normed input; Granite scales the
embedding by `embedding_multiplier` before layer 0. MoE FFNs of serial blocks stay: they read h.
"""

from __future__ import annotations

from torch import nn

from firstlayer.arch.base import TINY, Adapter, Parts, has_module

ATTENTION_NORMS = ("input_layernorm", "attention_layernorm")
HEAD_NORMS = ("{}_norm", "{}_layernorm")


def parts(model: nn.Module) -> Parts:
    block = "model.layers.0"
    attn = f"{block}.self_attn"
    projections = (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")
    head_norms = {
        f"{attn}.{p}_proj": f"{attn}.{norm.format(p)}"
        for p in "qk"
        for norm in HEAD_NORMS
        if has_module(model, f"{attn}.{norm.format(p)}")
    }
    attn_norm = next(
        (f"{block}.{n}" for n in ATTENTION_NORMS if has_module(model, f"{block}.{n}")), None
    )
    return Parts(
        embedding="model.embed_tokens",
        attn_norm=attn_norm,
        projections=projections,
        head_norms=head_norms,
        mlp=f"{block}.mlp",  # eliminated only when the blocks are parallel
        embedding_multiplier=getattr(model.config, "embedding_multiplier", None),
    )


# fmt: off
ADAPTER = Adapter(
    model_types=(
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "cohere", "cohere2", "stablelm", "olmo", "olmo2", "olmo3", "granite", "qwen2_moe",
        "qwen3_moe", "gpt_oss", "starcoder2", "nemotron", "glm4", "glm", "smollm3", "olmoe",
        "granitemoe", "helium", "exaone4", "arcee", "seed_oss", "ernie4_5", "apertus", "phimoe",
    ),
    parts=parts,
    tiny={**TINY, "intermediate_size": 96, "num_key_value_heads": 2},
)
# fmt: on
