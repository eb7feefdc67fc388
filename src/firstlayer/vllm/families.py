"""What the vLLM side knows of each family: where layer 0's parts are in vLLM's model classes.

vLLM keeps Hugging Face's module names for what a checkpoint holds (so `model.layers.0` and the
embedding's name match the folder), but fuses q, k and v into one module and gives layer 0 a
forward of its own per family. Only this module and `models` know vLLM's names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VllmFamily:
    """Layer 0 of one family as vLLM builds it, as attribute names within the layer."""

    layer: str  # layer 0 (`model.layers.0`)
    attention: str  # its attention module
    qkv: str  # the attention's fused q/k/v projection (a QKVParallelLinear)
    # How layer 0 runs from table rows:
    # "fused": vLLM's serial layer that takes (hidden_states, residual) and fuses the residual add
    #   into its norms; it is handed the rows through its attention norm (see models.py);
    # "gptj", "falcon": parallel blocks, attention(rows) + the table's x + mlp(x).
    kind: str
    norms: tuple[str, ...] = ()  # layer 0's norms in front of attention and MLP
    mlp: str | None = None  # parallel only: layer 0's MLP, which the table holds
    head_norms: tuple[str, ...] = ()  # attention's per-head q/k norms, applied in the rows
    scale: str | None = None  # the base model's buffer that scales the embedding (Gemma)


LLAMA_LIKE = VllmFamily(
    layer="model.layers.0",
    attention="self_attn",
    qkv="qkv_proj",
    kind="fused",
    norms=("input_layernorm",),
)
WITH_HEAD_NORMS = VllmFamily(**{**LLAMA_LIKE.__dict__, "head_norms": ("q_norm", "k_norm")})
GEMMA = VllmFamily(**{**LLAMA_LIKE.__dict__, "scale": "model.normalizer"})
GEMMA3 = VllmFamily(**{**GEMMA.__dict__, "head_norms": ("q_norm", "k_norm")})

# Families whose layer 0 follows vLLM's Llama pattern under other names.
GPT_OSS = VllmFamily(**{**LLAMA_LIKE.__dict__, "attention": "attn"})  # attention sinks stay
APERTUS = VllmFamily(**{**WITH_HEAD_NORMS.__dict__, "norms": ("attention_layernorm",)})

# Keyed by the family's transformers model type; vLLM names its classes as transformers does.
VLLM_FAMILIES: dict[str, VllmFamily] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "mixtral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": WITH_HEAD_NORMS,
    "gemma": GEMMA,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA3,
    "phi3": LLAMA_LIKE,
    "qwen2_moe": LLAMA_LIKE,
    "qwen3_moe": WITH_HEAD_NORMS,
    "olmoe": WITH_HEAD_NORMS,  # its q/k norms span all heads
    "gpt_oss": GPT_OSS,
    "nemotron": LLAMA_LIKE,
    "glm4": LLAMA_LIKE,  # sandwich norms after attention and MLP stay
    "apertus": APERTUS,
    "gptj": VllmFamily(
        layer="transformer.h.0",
        attention="attn",
        qkv="qkv_proj",
        kind="gptj",
        norms=("ln_1",),
        mlp="mlp",
    ),
    "falcon": VllmFamily(
        layer="transformer.h.0",
        attention="self_attention",
        qkv="query_key_value",
        kind="falcon",
        norms=("input_layernorm", "ln_attn", "ln_mlp"),
        mlp="mlp",
    ),
}

# Served through vLLM's Transformers backend (which builds the transformers model with vLLM's
# linears and attention; the plugin patches that model): families vLLM 0.32 has no class of its
# own for, and those whose own class's layer 0 the plugin does not patch yet.
# fmt: off
TRANSFORMERS_BACKEND = (
    "gpt_neox", "phi", "olmo", "olmo2", "olmo3", "starcoder2", "glm", "smollm3", "arcee",
    "seed_oss", "cohere", "granite", "granitemoe", "exaone4",
)
# fmt: on

# Families firstlayer converts that the plugin does not serve, and why (measured on vLLM 0.32).
NOT_SERVED = {
    "cohere2": "greedy tokens differ from vLLM's own Cohere2 class running the original",
    "ernie4_5": "greedy tokens differ from vLLM's own Ernie 4.5 class running the original, "
    "and its Transformers backend does not build it",
    "stablelm": "vLLM's StableLM has no per-head q/k LayerNorms (qk_layernorm configs fail "
    "in vLLM itself); not tested without them",
    "bloom": "vLLM's BLOOM layer 0 is not patched yet, and its Transformers backend refuses "
    "BLOOM (no position_ids)",
    "helium": "vLLM 0.32 has no Helium model",
    "phimoe": "vLLM 0.32 has no PhiMoE model",
    "mpt": "vLLM dropped MPT after 0.28",
}
