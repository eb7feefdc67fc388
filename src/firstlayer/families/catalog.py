"""Decoder families firstlayer does not convert, and why: the method does not apply to them, or
it does and nobody has declared them yet. Listed by `firstlayer families`; refused by name.

The method applies when nothing position-dependent reaches layer 0 with the token's embedding and
layer 0 is attention whose q, k and v read that embedding alone (arXiv 2402.13388, "Idea").
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_APPLICABLE = "not applicable"
NOT_YET = "not yet"


@dataclass(frozen=True)
class Refused:
    """Model types that share a status and a reason."""

    model_types: tuple[str, ...]
    status: str  # NOT_APPLICABLE or NOT_YET
    notes: str  # why not


# Families that add an absolute position embedding to the token embedding before layer 0.
# fmt: off
LEARNED_POSITIONS = (
    "gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt", "openai-gpt", "ctrl", "imagegpt", "bert",
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "electra", "albert",
    "megatron-bert", "ernie", "layoutlm", "mobilebert", "bert-generation", "xlm", "mpnet",
    "big_bird", "longformer", "data2vec-text", "bart", "mbart", "plbart", "mvp", "led",
    "blenderbot", "blenderbot-small", "blenderbot_small", "whisper", "git", "decision_transformer",
    "kosmos-2", "trocr",
)
SINUSOIDAL_POSITIONS = (
    "xglm", "marian", "pegasus", "pegasus_x", "m2m_100", "nllb-moe", "fsmt", "speech_to_text",
    "musicgen", "musicgen_melody", "prophetnet", "xlm-prophetnet",
)
# fmt: on
ABSOLUTE_POSITIONS = {
    **dict.fromkeys(LEARNED_POSITIONS, "a learned"),
    **dict.fromkeys(SINUSOIDAL_POSITIONS, "a sinusoidal"),
}
# llama.cpp architectures of refused families, so that a GGUF file is refused by its family's name.
GGUF_ARCHITECTURES = {"gpt2": "gpt2", "starcoder": "gpt_bigcode"}

# fmt: off
REFUSED: tuple[Refused, ...] = (
    Refused(LEARNED_POSITIONS, NOT_APPLICABLE,
            "a learned absolute position embedding is added to the token embedding before "
            "layer 0"),
    Refused(SINUSOIDAL_POSITIONS, NOT_APPLICABLE,
            "a sinusoidal absolute position embedding is added to the token embedding before "
            "layer 0"),
    Refused(("mamba", "mamba2", "falcon_mamba"), NOT_APPLICABLE,
            "layer 0 is a Mamba mixer, not attention: a causal convolution mixes tokens right "
            "after its input projection"),
    Refused(("rwkv",), NOT_APPLICABLE,
            "layer 0 mixes each token with the one before it (time shift) before its "
            "projections"),
    Refused(("recurrent_gemma",), NOT_APPLICABLE,
            "layer 0 is a recurrent block (causal convolution, RG-LRU), not attention"),
    Refused(("jamba", "bamba", "lfm2"), NOT_APPLICABLE,
            "layer 0 is a Mamba or short-convolution block by default, which mixes tokens"),
    Refused(("qwen3_next",), NOT_APPLICABLE,
            "layer 0 is linear attention (Gated DeltaNet) by default: a causal convolution "
            "mixes tokens before q, k and v are formed"),
    Refused(("deepseek_v2", "deepseek_v3"), NOT_YET,
            "multi-head latent attention: q and the compressed kv are token-local up to the "
            "RoPE split, but need columns of their own"),
    Refused(("falcon_h1",), NOT_YET,
            "attention and a Mamba mixer side by side in layer 0: the attention half could be "
            "tabled"),
    Refused(("gemma3n_text",), NOT_YET,
            "per-layer embeddings and AltUp before layer 0 (token-local, not folded yet)"),
    Refused(("glm4_moe", "ernie4_5_moe", "hunyuan_v1_dense", "hunyuan_v1_moe", "ministral",
             "granitemoeshared", "dbrx", "jetmoe", "dots1", "llama4_text"), NOT_YET,
            "RoPE attention, so the method should apply; no declaration or tests yet"),
)
# fmt: on
