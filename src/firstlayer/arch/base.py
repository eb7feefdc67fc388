"""Parts and Adapter: the only view of Hugging Face module names the rest of the package has."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Parts:
    """Where layer 0's token-local work lives in one model, as module names relative to the model.

    At run time `attn_norm` hands attention the table row instead of the normed embedding, and each
    projection becomes a slice of that row, so the family's own attention and layer code (RoPE,
    caches, masks, sliding windows, sandwich norms) run unchanged.
    """

    embedding: str  # input embedding; may scale its output (Gemma's embed_scale)
    attn_norm: str | None  # norm in front of attention; None where layers norm only after it
    projections: tuple[str, ...]  # q, k, v projections (or one fused qkv), in table column order
    head_norms: Mapping[str, str] = field(default_factory=dict)  # projection -> its per-head norm
    lm_head: str = "lm_head"
    mlp_norm: str | None = None  # parallel only, when the MLP has a norm of its own
    mlp: str | None = None  # parallel only: precomputed as r = x + mlp(mlp_norm(x))
    # Token-local steps the base model takes between the embedding and layer 0; they stay at run
    # time (so a tied LM head can still read the stored x) and the q/k/v columns include them.
    embedding_multiplier: float | None = None  # Granite: x = E[t] * embedding_multiplier
    embedding_norm: str | None = None  # BLOOM: x = word_embeddings_layernorm(E[t])

    @property
    def base_model(self) -> str:
        """The module that takes input_ids and runs the layers (`model`, `gpt_neox`, ...)."""
        return self.embedding.rpartition(".")[0]

    @property
    def layer(self) -> str:
        """Layer 0 itself, the parent of its attention."""
        return self.attention.rpartition(".")[0]

    @property
    def attention(self) -> str:
        """Layer 0's attention module, the parent of its projections."""
        return self.projections[0].rpartition(".")[0]

    @property
    def has_steps_before_layer0(self) -> bool:
        return self.embedding_multiplier is not None or self.embedding_norm is not None

    def eliminated(self, is_parallel: bool) -> tuple[str, ...]:
        """Modules whose weights the table replaces (the embedding itself aside)."""
        names = [self.attn_norm, *self.projections, *self.head_norms.values()]
        if is_parallel:
            names += [self.mlp_norm, self.mlp]
        return tuple(n for n in names if n is not None)

    def token_local(self, is_parallel: bool) -> tuple[str, ...]:
        """Modules the table is computed from: the eliminated ones and the embedding's norm."""
        before = (self.embedding_norm,) if self.embedding_norm else ()
        return (*before, *self.eliminated(is_parallel))


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


def embed_scale(embedding: nn.Module) -> float | None:
    """The factor a scaled word embedding multiplies its rows by (Gemma: sqrt(D)), else None.

    Read from the Python float Gemma keeps beside its buffer: on the meta device (transformers'
    empty init) the buffer holds no value.
    """
    scale = getattr(embedding, "scalar_embed_scale", None)
    return float(scale) if scale is not None else None


def scale_in(scale: float, dtype: torch.dtype) -> Tensor:
    """sqrt(D) as Gemma multiplies by it: a float32 scalar cast to the rows' dtype first
    (55.4256 -> 55.5 in bf16); the table must use the same factor."""
    return torch.tensor(scale, dtype=torch.float32).to(dtype)


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def threads_kwargs_to_attention(model: nn.Module, parts: Parts) -> bool:
    """Whether this transformers release hands the model call's keyword arguments through to
    layer 0's attention: the base model calls its layers with `**kwargs`, and layer 0 calls its
    attention with `**kwargs`. Read from the installed code, since releases differ (GPT-J has it
    in 5.24, not in 5.19; Falcon in neither)."""
    attention_attr = parts.attention.removeprefix(parts.layer + ".")
    base_model = model.get_submodule(parts.base_model)
    layer = model.get_submodule(parts.layer)
    calls_layers = _calls_with_kwargs(type(base_model).forward, lambda f: isinstance(f, ast.Name))
    calls_attention = _calls_with_kwargs(
        type(layer).forward,
        lambda f: (
            isinstance(f, ast.Attribute)
            and f.attr == attention_attr
            and isinstance(f.value, ast.Name)
            and f.value.id == "self"
        ),
    )
    return calls_layers and calls_attention


def _calls_with_kwargs(function: Callable, callee: Callable[[ast.expr], bool]) -> bool:
    """Whether `function`'s source calls something `callee` accepts with `**kwargs`."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
    except (OSError, TypeError):
        return False
    return any(
        isinstance(node, ast.Call)
        and callee(node.func)
        and any(k.arg is None and isinstance(k.value, ast.Name) for k in node.keywords)
        for node in ast.walk(ast.parse(source))
    )
