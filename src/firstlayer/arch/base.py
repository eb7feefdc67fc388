"""Parts and Adapter: the only view of Hugging Face module names the rest of the package has."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Parts:
    """Where layer 0's token-local work lives in one model, as module names relative to the model.

    At run time `attn_norm` hands attention the table row instead of the normed embedding, and each
    projection becomes a slice of that row, so the family's own attention and layer code (RoPE,
    caches, masks, sliding windows, sandwich norms) run unchanged.
    """

    embedding: str  # input embedding; may scale its output (Gemma's embed_scale)
    attn_norm: str  # norm in front of attention
    projections: tuple[str, ...]  # q, k, v projections (or one fused qkv), in table column order
    head_norms: Mapping[str, str] = field(default_factory=dict)  # projection -> its per-head norm
    lm_head: str = "lm_head"
    mlp_norm: str | None = None  # parallel only, when the MLP has a norm of its own
    mlp: str | None = None  # parallel only: precomputed as r = x + mlp(mlp_norm(x))

    def eliminated(self, is_parallel: bool) -> tuple[str, ...]:
        """Modules whose weights the table replaces (the embedding itself aside)."""
        names = [self.attn_norm, *self.projections, *self.head_norms.values()]
        if is_parallel:
            names += [n for n in (self.mlp_norm, self.mlp) if n is not None]
        return tuple(names)


@dataclass(frozen=True)
class Adapter:
    """One Hugging Face family: how to find its parts, and a tiny config for the tests."""

    model_types: tuple[str, ...]
    parts: Callable[[nn.Module], Parts]
    tiny: Mapping[str, Any]  # AutoConfig.for_model(model_type, **tiny) builds a test model


# The dimensions every family's test model shares; adapters add what their config calls differently.
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def embed_scale(embedding: nn.Module) -> Tensor | None:
    """The factor a scaled word embedding multiplies its rows by (Gemma: sqrt(D)), else None."""
    # Gemma's *ScaledWordEmbedding keeps sqrt(D) as a float32 buffer and casts it to the weight's
    # dtype before multiplying (55.4256 -> 55.5 in bf16); the table must use the same factor.
    scale = getattr(embedding, "embed_scale", None)
    return scale.to(embedding.weight.dtype) if isinstance(scale, Tensor) else None


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
