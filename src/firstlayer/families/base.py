"""What firstlayer knows about a family, declared once (llama.cpp's converter is the model: one
class per family, registered for every model type it serves, overriding only what differs).

A declaration is read by the analyser (config defaults, widths, biases and norms), the GGUF
reader (llama.cpp's architecture names), the converter and runtime (where layer 0's token-local
modules are, as Hugging Face names them) and the vLLM plugin (how vLLM builds layer 0). No torch,
no transformers: `firstlayer analyze` reads it too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from firstlayer.errors import FirstLayerError

if TYPE_CHECKING:
    from torch import nn

SERIAL = "serial"
PARALLEL = "parallel"
BY_CONFIG = "parallel or serial (config)"

# The dimensions every family's test model shares; a family adds what its config calls otherwise.
TINY: Mapping[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=256,
    max_position_embeddings=256,
)

# The generic config field names, first match wins (families that name a field otherwise).
HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model")
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
FFN = ("intermediate_size", "n_inner", "ffn_hidden_size")
ACTIVATION = ("hidden_activation", "hidden_act", "activation_function", "activation")


# --- reading a config dict ------------------------------------------------------------------


def first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def integer(cfg: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    value = first(cfg, keys)
    return default if value is None else checked(keys[0], value)


def required(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    value = first(cfg, keys)
    if value is not None:
        return checked(keys[0], value)
    t, fields = cfg["model_type"], " / ".join(keys)
    if "text_config" in cfg:
        raise FirstLayerError(
            f"the {t} config keeps its language model under text_config: save that section, with "
            "its model_type, as a config.json of its own and pass it"
        )
    raise FirstLayerError(f"the {t} config has no {fields}: pass the config.json that states it")


def checked(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FirstLayerError(f"config field {key} is {value!r}: it must be a positive integer")
    return value


# --- what a declaration says ----------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """Where layer 0's token-local work lives in one transformers model, as module names.

    At run time `attn_norm` hands attention the table row instead of the normed embedding, and each
    projection becomes a slice of that row, so the family's own attention and layer code (RoPE,
    caches, masks, sliding windows, sandwich norms) run unchanged.
    """

    embedding: str  # input embedding
    attn_norm: str | None  # norm in front of attention; None where layers norm only after it
    projections: tuple[str, ...]  # q, k, v projections (or one fused qkv), in table column order
    # projection -> its per-head (or full-width) q/k norm, folded into the table's columns
    head_norms: Mapping[str, str] = field(default_factory=dict)
    # The same norms where the table holds q and k before them and the model keeps and runs them
    # (`head_norms_at_run_time`): an adapter's change to q or k then enters before the norm, as in
    # the original.
    run_head_norms: Mapping[str, str] = field(default_factory=dict)
    lm_head: str = "lm_head"
    mlp_norm: str | None = None  # parallel only, when the MLP has a norm of its own
    mlp: str | None = None  # parallel only: precomputed as r = x + mlp(mlp_norm(x))
    # The factor the embedding multiplies its rows by (Gemma: sqrt(D)); applied at run time, so
    # the stored x can also serve a tied LM head.
    embedding_scale: float | None = None
    # Token-local steps the base model takes between the embedding and layer 0; they stay at run
    # time (so a tied LM head can still read the stored x) and the q/k/v columns include them.
    embedding_multiplier: float | None = None  # x = E[t] * embedding_multiplier
    embedding_norm: str | None = None  # x = embedding_norm(E[t])

    @property
    def base_model(self) -> str:
        """The module that takes input_ids and runs the layers: the embedding's parent."""
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

    def head_norms_at_run_time(self) -> Parts:
        """These parts with the q/k norms kept in the model, run on the table's q/k columns."""
        return replace(self, head_norms={}, run_head_norms=self.head_norms)

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
class LayerExtras:
    """One decoder layer's biases and norms, what an exact parameter count needs beyond the
    weight matrices; the defaults are Llama's (no biases, two RMSNorms)."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_vectors: int = 1  # d-wide vectors per norm: RMSNorm 1, LayerNorm 2, non-parametric 0
    norms_per_layer: int = 2
    has_attn_norm: bool = True  # False where layers norm only after attention
    has_mlp_norm: bool = False  # parallel blocks only: the FFN has a norm of its own
    qk_norm_weights: int = 0  # per layer: per-head q/k gains, or full-width ones
    small_per_layer: int = 0  # attention sinks, router biases, activation gains
    shared_expert_hidden: int = 0  # a gated FFN every token uses, and its gate (d)
    embedding_norm_vectors: int = 0  # a norm on the embedding, before layer 0
    lm_head_bias: bool = False
    is_bias_free_layernorm: bool = False  # a LayerNorm without its bias (one vector)
    is_known: bool = True  # False: an unknown family, counted as a Llama-style layer


# How vLLM runs one family's layer 0. Layer kinds (the plugin has a layer class for each):
#   serial: vLLM's serial layer that takes (hidden_states, residual) and fuses the residual add
#     into its norms; it is handed the table row through its attention norm;
#   parallel: a parallel block whose attention returns its output;
#   parallel_with_bias: a parallel block whose attention returns (output, bias) and which may
#     leave the all-reduce to after attention and MLP are summed.
VLLM_LAYER_KINDS = ("serial", "parallel", "parallel_with_bias")


@dataclass(frozen=True)
class VllmOwnClass:
    """vLLM's own class for the family, its layer 0 patched: names as vLLM's model tree has them."""

    layer: str = "model.layers.0"
    attention: str = "self_attn"  # layer 0's attention module, within the layer
    qkv: str = "qkv_proj"  # the attention's fused q/k/v projection (a QKVParallelLinear)
    kind: str = "serial"  # one of VLLM_LAYER_KINDS
    norms: tuple[str, ...] = ("input_layernorm",)  # layer 0's norms in front of attention and MLP
    mlp: str | None = None  # parallel only: layer 0's MLP, which the table holds
    head_norms: tuple[str, ...] = ()  # attention's per-head q/k norms, applied in the rows
    scale: str | None = None  # the base model's buffer that scales the embedding

    def __post_init__(self) -> None:
        assert self.kind in VLLM_LAYER_KINDS, self.kind


@dataclass(frozen=True)
class VllmBackend:
    """vLLM's Transformers backend builds the family's transformers model with vLLM's linears and
    attention; the plugin patches it as on the transformers side (one rank)."""


@dataclass(frozen=True)
class VllmNotServed:
    """The plugin refuses the family in vLLM, with the measured reason."""

    reason: str


VllmRoute = VllmOwnClass | VllmBackend | VllmNotServed
VLLM_LLAMA = VllmOwnClass()
VLLM_BACKEND = VllmBackend()


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# Every declared model type and its declaration, filled by `register_family` as the modules of this
# package are imported (`firstlayer.families` imports them all).
REGISTRY: dict[str, Family] = {}


def register_family(*model_types: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: the declaration serves these model types, as llama.cpp's
    `ModelBase.register_family` lists every architecture one converter class serves."""

    def declare(cls: type[Family]) -> type[Family]:
        cls.model_types = model_types
        # What a subclass does not declare itself is not inherited: its parent's GGUF names and
        # per-type routes belong to the parent's model types.
        for attribute in ("gguf", "vllm_by_type"):
            if attribute not in cls.__dict__:
                setattr(cls, attribute, {})
        missing = [t for t in model_types if t not in cls.defaults]
        assert not missing, f"{cls.__name__} declares no config defaults for {missing}"
        family = cls()
        for model_type in model_types:
            assert model_type not in REGISTRY, f"{model_type} is declared twice"
            REGISTRY[model_type] = family
        return cls

    return declare


class Family:
    """A family's declaration; the defaults are those of a Llama-style serial decoder.

    Subclass it, set what differs, and declare it with `@register_family("model_type", ...)`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()  # set by `register_family`
    blocks: ClassVar[str] = SERIAL  # for `firstlayer families`: SERIAL, PARALLEL or BY_CONFIG
    notes: ClassVar[str] = ""  # for `firstlayer families`: what is special
    # Per model type: the config fields transformers fills in when config.json leaves them out
    # (a test checks them against the config classes).
    defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    gguf: ClassVar[Mapping[str, str]] = {}  # llama.cpp's general.architecture -> model type
    tiny: ClassVar[Mapping[str, Any]] = TINY  # AutoConfig.for_model(t, **tiny): a test model
    is_known: ClassVar[bool] = True
    is_fused_qkv: ClassVar[bool] = False  # q, k and v are one projection
    is_multimodal: ClassVar[bool] = False  # a vision tower beside the language model
    has_even_heads: ClassVar[bool] = False  # attention splits d evenly, whatever head_dim says
    has_plain_mlp: ClassVar[bool] = False  # fc_in/fc_out (or up/down), no gate
    is_moe: ClassVar[bool] = False
    default_experts: ClassVar[int] = 1  # applied last: the config may name the count two ways
    vllm: ClassVar[VllmRoute] = VLLM_LLAMA
    vllm_by_type: ClassVar[Mapping[str, VllmRoute]] = {}  # model types routed otherwise

    # --- the analyser: a config dict with the defaults applied ---

    def is_parallel(self, cfg: Mapping[str, Any]) -> bool:
        """Whether layer 0's attention and FFN both read its input."""
        return False

    def head_dim(self, cfg: Mapping[str, Any], d: int, n_heads: int) -> int:
        if not self.has_even_heads and cfg.get("head_dim"):
            return checked("head_dim", cfg["head_dim"])
        if d % n_heads:
            raise FirstLayerError(
                f"hidden size {d} does not split over {n_heads} heads and the config gives no "
                "head_dim: add head_dim to config.json"
            )
        return d // n_heads

    def kv_heads(self, cfg: Mapping[str, Any], n_heads: int) -> int:
        return integer(cfg, ("num_key_value_heads", "num_kv_heads"), default=n_heads)

    def n_experts(self, cfg: Mapping[str, Any]) -> int:
        if not self.is_moe:
            return 1
        # Some dense configs write num_experts: 0.
        n = first(cfg, ("num_local_experts", "num_experts")) or self.default_experts
        return checked("num_local_experts", n)

    def ffn_matrices(self, cfg: Mapping[str, Any]) -> int:
        return 2 if self.has_plain_mlp else 3

    def ffn_hidden(self, cfg: Mapping[str, Any], d: int) -> int:
        return required(cfg, ("intermediate_size",))

    def layer_extras(
        self, cfg: Mapping[str, Any], q_dim: int, e: int, head_dim: int
    ) -> LayerExtras:
        """Biases and norms of one decoder layer, as the family's modeling file builds them."""
        bias = bool(cfg.get("attention_bias", False))  # q, k, v and o
        return LayerExtras(
            bias,
            bias,
            bool(cfg.get("mlp_bias", False)),
            lm_head_bias=bool(cfg.get("lm_head_bias", False)),
            is_known=self.is_known,
        )

    def gguf_config(
        self, arch: str, meta: Callable[[str], Any], has: Callable[[str], bool], config: dict
    ) -> dict[str, Any]:
        """Config fields a GGUF file of this family leaves implicit (in which tensors it holds,
        or in metadata under llama.cpp's names); `config` is what was read generically."""
        n_experts = meta(f"{arch}.expert_count") or 0
        if n_experts <= 1:
            return {}
        return {
            "num_experts": n_experts,
            "num_experts_per_tok": meta(f"{arch}.expert_used_count"),
            "moe_intermediate_size": meta(f"{arch}.expert_feed_forward_length"),
        }

    # --- the converter and the transformers runtime ---

    def parts(self, model: nn.Module) -> Parts:
        """Layer 0's token-local modules in a transformers model of this family."""
        raise NotImplementedError(f"{type(self).__name__} declares no transformers parts")

    # --- the vLLM plugin ---

    def vllm_route(self, model_type: str) -> VllmRoute:
        return self.vllm_by_type.get(model_type, self.vllm)


ATTENTION_NORMS = ("input_layernorm", "attention_layernorm")
HEAD_NORMS = ("{}_norm", "{}_layernorm")


class LlamaNames(Family):
    """The declaration most families share: Llama's module names (`model.layers.N.self_attn.
    q_proj`, ...) and its serial layer. What differs between them is found by name: the attention
    norm is `input_layernorm` (`attention_layernorm` where a family calls it so; none where
    layers norm only after attention), and per-head q/k norms (`q_norm`, or `q_layernorm`) are
    token-local: folded into a parallel block's table, run on a serial block's stored q/k
    (`Parts.run_head_norms`). MoE FFNs of serial blocks stay: they read h, not x.
    """

    tiny = {**TINY, "intermediate_size": 96, "num_key_value_heads": 2}

    def layer_extras(
        self, cfg: Mapping[str, Any], q_dim: int, e: int, head_dim: int
    ) -> LayerExtras:
        bias = bool(cfg.get("attention_bias", False))  # q, k, v and o
        return LayerExtras(
            bias,
            bias,
            bool(cfg.get("mlp_bias", False)),
            qk_norm_weights=self.qk_norm_weights(q_dim, e, head_dim),
            small_per_layer=self.small_per_layer(cfg),
            lm_head_bias=bool(cfg.get("lm_head_bias", False)),
        )

    def qk_norm_weights(self, q_dim: int, e: int, head_dim: int) -> int:
        """Per layer: the gains of q/k norms (per head, or across all heads)."""
        return 0

    def small_per_layer(self, cfg: Mapping[str, Any]) -> int:
        """Per layer: attention sinks, router biases, an activation's own gains."""
        return 0

    def parts(self, model: nn.Module) -> Parts:
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
        )
