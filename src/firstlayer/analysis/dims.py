"""Model dimensions from a Hugging Face config dict alone (no torch, no transformers).

Everything `savings` counts comes from here: the widths of arXiv 2402.13388's table (d, q_dim, e),
whether blocks are parallel, and the small parameters (biases, norm gains) an exact count needs.
Each family's declaration (`firstlayer.families`) says how its config reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from firstlayer.families import config_with_defaults, is_parallel, reading_of
from firstlayer.families.base import (
    ACTIVATION,
    HEADS,
    HIDDEN,
    LAYERS,
    LayerExtras,
    first,
    integer,
    required,
)

# An unknown family's own default is unknown; True is BLOOM's, MPT's and transformers v4's.
GENERIC_TIED = True


@dataclass(frozen=True)
class ModelDims:
    """One decoder-only model's shapes, as its config.json states them (paper notation: d, e)."""

    name: str
    model_type: str
    d: int  # hidden size: the embedding width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # Gemma gives it explicitly, and it is not d / n_heads
    ffn_hidden: int  # per expert for MoE
    ffn_matrices: int  # 2 for fc_in/fc_out, 3 for a gated (GLU) FFN
    activation: str  # as the config names it: silu, gelu_new, ...
    n_experts: int  # 1 for a dense FFN
    experts_per_token: int
    vocab_size: int
    is_tied: bool  # LM head shares the input embedding
    is_parallel: bool  # attention and FFN both read layer 0's input
    is_fused_qkv: bool  # q, k and v are one projection (its int8 table gets a scale per head)
    extras: LayerExtras  # biases and norms: what an exact count needs beyond the matrices
    # Layer 0's q/k/v stay beside the table (a multimodal model's image positions run them).
    keeps_layer0: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def e(self) -> int:
        """Width of K and of V: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def attention(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    @property
    def architecture(self) -> str:
        return "parallel" if self.is_parallel else "serial"

    @property
    def norm_kind(self) -> str:
        if self.extras.norm_vectors != 1:
            return "LayerNorm" if self.extras.norm_vectors == 2 else "LayerNorm (no weights)"
        return "LayerNorm (no bias)" if self.extras.is_bias_free_layernorm else "RMSNorm"

    @property
    def ffn_type(self) -> str:
        """The paper's label: 2-layer MLP, SwiGLU, GeGLU; 'MoE' appended for experts."""
        if self.ffn_matrices == 2:
            label = "2-layer MLP"
        elif self.activation in ("silu", "swish"):
            label = "SwiGLU"
        elif self.activation.startswith("gelu"):
            label = "GeGLU"
        else:
            label = f"{self.activation} GLU"
        return f"{label} MoE" if self.n_experts > 1 else label


def model_dims(config: Mapping[str, Any], name: str | None = None) -> ModelDims:
    """Read a model's dimensions from its Hugging Face config dict.

    Refuses families with an absolute position embedding. Unknown model types are read through the
    generic field names and counted as serial, Llama-style layers (`extras.is_known` is False).
    """
    cfg = config_with_defaults(config)
    keeps_layer0 = reading_of(cfg["model_type"]).is_multimodal
    if keeps_layer0:  # counted as its language model, the vision tower aside
        cfg = config_with_defaults(reading_of(cfg["model_type"]).text_config(cfg))
    t = cfg["model_type"]
    family = reading_of(t)
    d = required(cfg, HIDDEN)
    n_heads = required(cfg, HEADS)
    head_dim = family.head_dim(cfg, d, n_heads)
    n_kv_heads = family.kv_heads(cfg, n_heads)
    n_experts = family.n_experts(cfg)
    return ModelDims(
        name=name or str(cfg.get("_name_or_path") or t),
        model_type=t,
        d=d,
        n_layers=required(cfg, LAYERS),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_hidden=family.ffn_hidden(cfg, d),
        ffn_matrices=family.ffn_matrices(cfg),
        activation=str(first(cfg, ACTIVATION) or "silu"),
        n_experts=n_experts,
        experts_per_token=integer(cfg, ("num_experts_per_tok",), default=1) if n_experts > 1 else 1,
        vocab_size=required(cfg, ("vocab_size",)),
        is_tied=bool(cfg.get("tie_word_embeddings", GENERIC_TIED)),
        is_parallel=is_parallel(cfg),
        is_fused_qkv=family.is_fused_qkv,
        extras=family.layer_extras(cfg, n_heads * head_dim, n_kv_heads * head_dim, head_dim),
        keeps_layer0=keeps_layer0,
    )
