"""Every decoder family firstlayer knows and what it does with each: supported (parallel or serial),
not applicable and why, or not yet. One list for `firstlayer families`, the README's table, the
converter's refusals and the analyser's; no torch, no transformers.

The method applies when nothing position-dependent reaches layer 0 with the token's embedding and
layer 0 is attention whose q, k and v read that embedding alone (arXiv 2402.13388, "Idea").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from firstlayer.errors import FirstLayerError

SUPPORTED = "supported"
NOT_APPLICABLE = "not applicable"
NOT_YET = "not yet"
STATUSES = (SUPPORTED, NOT_APPLICABLE, NOT_YET)


@dataclass(frozen=True)
class FamilyRow:
    """One row of the list: model types that share a status, blocks and notes."""

    model_types: tuple[str, ...]
    status: str
    blocks: str  # supported: serial, parallel, or "parallel or serial (config)"; else "-"
    notes: str  # supported: what is special; otherwise why it is refused

    def to_dicts(self) -> list[dict]:
        record = {k: v for k, v in asdict(self).items() if k != "model_types"}
        return [{"model_type": t, **record} for t in self.model_types]


BY_CONFIG = "parallel or serial (config)"

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

# fmt: off
ROWS: tuple[FamilyRow, ...] = (
    FamilyRow(("llama", "mistral", "helium", "arcee"), SUPPORTED, "serial", "Llama's names"),
    FamilyRow(("mixtral", "granitemoe", "phimoe"), SUPPORTED, "serial",
              "MoE FFN stays (it reads h, not x)"),
    FamilyRow(("qwen2",), SUPPORTED, "serial", "q/k/v biases in the table"),
    FamilyRow(("qwen3",), SUPPORTED, "serial", "per-head q/k norms folded in before RoPE"),
    FamilyRow(("qwen2_moe",), SUPPORTED, "serial",
              "q/k/v biases in the table; MoE with a shared expert stays"),
    FamilyRow(("qwen3_moe",), SUPPORTED, "serial", "per-head q/k norms folded in; MoE stays"),
    FamilyRow(("gemma", "gemma2", "gemma3_text"), SUPPORTED, "serial",
              "x scaled by sqrt(d) at run time; head_dim != d/n_heads; sandwich norms, "
              "sliding-window layer 0 (gemma3)"),
    FamilyRow(("phi3",), SUPPORTED, "serial", "fused qkv_proj"),
    FamilyRow(("gpt_neox",), SUPPORTED, BY_CONFIG,
              "`use_parallel_residual`; q, k, v interleaved per head"),
    FamilyRow(("gptj",), SUPPORTED, "parallel", "one shared norm, interleaved rotary"),
    FamilyRow(("phi",), SUPPORTED, "parallel",
              "Phi-1, 1.5, 2: one shared norm, partial rotary, optional qk layernorm"),
    FamilyRow(("falcon",), SUPPORTED, BY_CONFIG,
              "`parallel_attn` or the new decoder architecture; multi-query or grouped kv"),
    FamilyRow(("cohere", "cohere2"), SUPPORTED, "parallel",
              "one shared LayerNorm; tied LM head with logit scale; optional per-head q/k norms "
              "(cohere), sliding windows and NoPE layers (cohere2)"),
    FamilyRow(("stablelm",), SUPPORTED, BY_CONFIG,
              "`use_parallel_residual`; per-head q/k LayerNorms folded in"),
    FamilyRow(("olmo",), SUPPORTED, "serial",
              "norms without weights; clip_qkv clamps the stored q/k/v at run time"),
    FamilyRow(("olmo2", "olmo3"), SUPPORTED, "serial",
              "no norm before attention; q/k norms across all heads folded in"),
    FamilyRow(("olmoe",), SUPPORTED, "serial", "q/k norms across all heads folded in; MoE stays"),
    FamilyRow(("exaone4",), SUPPORTED, "serial",
              "no norm before attention; per-head q/k norms folded in"),
    FamilyRow(("apertus",), SUPPORTED, "serial",
              "`attention_layernorm`; per-head q/k norms folded in"),
    FamilyRow(("granite",), SUPPORTED, "serial",
              "x * embedding_multiplier before layer 0: in the q/k/v columns, at run time for x"),
    FamilyRow(("gpt_oss",), SUPPORTED, "serial",
              "q/k/v biases in the table; sinks, alternating sliding windows and MoE stay"),
    FamilyRow(("starcoder2",), SUPPORTED, "serial", "LayerNorm, biases"),
    FamilyRow(("nemotron",), SUPPORTED, "serial", "LayerNorm1P (gain + 1), partial rotary"),
    FamilyRow(("glm", "glm4"), SUPPORTED, "serial",
              "q/k/v biases in the table; sandwich norms (glm4)"),
    FamilyRow(("seed_oss", "ernie4_5"), SUPPORTED, "serial", "q/k/v biases in the table"),
    FamilyRow(("smollm3",), SUPPORTED, "serial", "layers without RoPE work unchanged"),
    FamilyRow(("bloom",), SUPPORTED, "serial",
              "ALiBi; the embedding's LayerNorm: in the q/k/v columns, at run time for x"),
    FamilyRow(("mpt",), SUPPORTED, "serial", "ALiBi; fused Wqkv, clip_qkv at run time"),
    FamilyRow(LEARNED_POSITIONS, NOT_APPLICABLE, "-",
              "a learned absolute position embedding is added to the token embedding before "
              "layer 0"),
    FamilyRow(SINUSOIDAL_POSITIONS, NOT_APPLICABLE, "-",
              "a sinusoidal absolute position embedding is added to the token embedding before "
              "layer 0"),
    FamilyRow(("mamba", "mamba2", "falcon_mamba"), NOT_APPLICABLE, "-",
              "layer 0 is a Mamba mixer, not attention: a causal convolution mixes tokens right "
              "after its input projection"),
    FamilyRow(("rwkv",), NOT_APPLICABLE, "-",
              "layer 0 mixes each token with the one before it (time shift) before its "
              "projections"),
    FamilyRow(("recurrent_gemma",), NOT_APPLICABLE, "-",
              "layer 0 is a recurrent block (causal convolution, RG-LRU), not attention"),
    FamilyRow(("jamba", "bamba", "lfm2"), NOT_APPLICABLE, "-",
              "layer 0 is a Mamba or short-convolution block by default, which mixes tokens"),
    FamilyRow(("qwen3_next",), NOT_APPLICABLE, "-",
              "layer 0 is linear attention (Gated DeltaNet) by default: a causal convolution "
              "mixes tokens before q, k and v are formed"),
    FamilyRow(("deepseek_v2", "deepseek_v3"), NOT_YET, "-",
              "multi-head latent attention: q and the compressed kv are token-local up to the "
              "RoPE split, but need columns of their own"),
    FamilyRow(("falcon_h1",), NOT_YET, "-",
              "attention and a Mamba mixer side by side in layer 0: the attention half could be "
              "tabled"),
    FamilyRow(("gemma3n_text",), NOT_YET, "-",
              "per-layer embeddings and AltUp before layer 0 (token-local, not folded yet)"),
    FamilyRow(("glm4_moe", "ernie4_5_moe", "hunyuan_v1_dense", "hunyuan_v1_moe", "ministral",
               "granitemoeshared", "dbrx", "jetmoe", "dots1", "llama4_text"), NOT_YET, "-",
              "RoPE attention, so the method should apply; no adapter or tests yet"),
)
# fmt: on

FAMILIES: dict[str, dict] = {d["model_type"]: d for row in ROWS for d in row.to_dicts()}
SUPPORTED_TYPES = tuple(t for t, d in FAMILIES.items() if d["status"] == SUPPORTED)


def refuse_not_applicable(model_type: str) -> None:
    """Raise for families the method cannot serve, with the reason."""
    kind = ABSOLUTE_POSITIONS.get(model_type)
    if kind is not None:
        raise FirstLayerError(
            f"{model_type} adds {kind} absolute position embedding to the token embedding before "
            "layer 0, so layer 0's work is not a function of the token id alone (arXiv 2402.13388 "
            "needs RoPE, ALiBi or no position encoding): use a model such as Llama, Mistral, Qwen, "
            "Gemma, Pythia, Phi, Falcon or SmolLM"
        )
    family = FAMILIES.get(model_type)
    if family is not None and family["status"] == NOT_APPLICABLE:
        raise FirstLayerError(
            f"{model_type} cannot be precomputed: {family['notes']}, so layer 0's work is not a "
            "function of the token id alone (`firstlayer families` lists the supported families)"
        )


def refuse_not_supported(model_type: str) -> None:
    """Raise for a family the converter does not serve: why not, or that it does not yet."""
    refuse_not_applicable(model_type)
    if model_type not in SUPPORTED_TYPES:
        family = FAMILIES.get(model_type)
        why = f" ({family['notes']})" if family else ""
        raise FirstLayerError(
            f"model type {model_type!r} is not supported yet{why}; supported: "
            f"{', '.join(SUPPORTED_TYPES)} (`firstlayer analyze` still estimates its savings)"
        )


def families_markdown() -> str:
    """The README's family table, row for row this list."""
    lines = ["| family (`model_type`) | status | blocks | notes |", "|---|---|---|---|"]
    for row in ROWS:
        types = ", ".join(row.model_types)
        lines.append(f"| {types} | {row.status} | {row.blocks} | {row.notes} |")
    return "\n".join(lines) + "\n"


def families_text() -> str:
    """One line a model type, grouped by status."""
    lines = []
    for status in STATUSES:
        entries = [d for d in FAMILIES.values() if d["status"] == status]
        lines.append(f"{status} ({len(entries)}):")
        for d in entries:
            blocks = f"{d['blocks']:<28} " if status == SUPPORTED else ""
            lines.append(f"  {d['model_type']:<20} {blocks}{d['notes']}")
    return "\n".join(lines) + "\n"
