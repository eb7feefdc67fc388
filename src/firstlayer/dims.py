"""Model dimensions from a Hugging Face config dict alone (no torch, no transformers).

Everything `savings` counts comes from here: the widths of arXiv 2402.13388's table (d, q_dim, e),
whether blocks are parallel, and the small parameters (biases, norm gains) an exact count needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from firstlayer.errors import FirstLayerError
from firstlayer.families import refuse_not_applicable

# The paper's hypothetical parallel Mixtral has no Hugging Face form; its preset sets this key.
HYPOTHETICAL_PARALLEL = "firstlayer_hypothetical_parallel"

# The per-family defaults transformers fills in when config.json leaves a field out; a test checks
# them against the config classes. Generic fall-backs (num_key_value_heads -> heads) are in code.
# fmt: off
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "granite": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "smollm3": {"tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False},
    "mistral": {"tie_word_embeddings": False, "num_key_value_heads": 8},
    "mixtral": {"tie_word_embeddings": False, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2": {"tie_word_embeddings": False, "num_key_value_heads": 32},
    "qwen3": {"tie_word_embeddings": False, "num_key_value_heads": 32, "head_dim": 128,
              "attention_bias": False},
    "gemma": {"tie_word_embeddings": True, "num_key_value_heads": 16, "head_dim": 256,
              "attention_bias": False, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256,
               "attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256,
                    "attention_bias": False, "hidden_activation": "gelu_pytorch_tanh"},
    "phi3": {"tie_word_embeddings": False},
    "olmo": {"tie_word_embeddings": False, "attention_bias": False},
    "olmo2": {"tie_word_embeddings": False, "attention_bias": False},
    "cohere": {"tie_word_embeddings": True, "attention_bias": False, "use_qk_norm": False},
    "stablelm": {"tie_word_embeddings": False, "num_key_value_heads": 32, "use_qkv_bias": False,
                 "qk_layernorm": False, "use_parallel_residual": False},
    "starcoder2": {"tie_word_embeddings": True, "num_key_value_heads": 2, "use_bias": True,
                   "hidden_act": "gelu_pytorch_tanh"},
    "gpt_neox": {"tie_word_embeddings": False, "use_parallel_residual": True,
                 "attention_bias": True, "hidden_act": "gelu"},
    "gptj": {"tie_word_embeddings": False, "activation_function": "gelu_new"},
    "phi": {"tie_word_embeddings": False, "qk_layernorm": False, "hidden_act": "gelu_new"},
    "falcon": {"tie_word_embeddings": True, "parallel_attn": True, "multi_query": True,
               "new_decoder_architecture": False, "bias": False, "alibi": False,
               "activation": "gelu"},
    "bloom": {"tie_word_embeddings": True},
    "mpt": {"tie_word_embeddings": True, "no_bias": True},
    "cohere2": {"tie_word_embeddings": True, "attention_bias": False},
    "olmo3": {"tie_word_embeddings": False, "attention_bias": False},
    "olmoe": {"tie_word_embeddings": False, "attention_bias": False, "num_experts": 64,
              "num_experts_per_tok": 8},
    "granitemoe": {"tie_word_embeddings": False, "attention_bias": False,
                   "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"tie_word_embeddings": False, "num_key_value_heads": 16, "qkv_bias": True,
                  "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"tie_word_embeddings": False, "num_key_value_heads": 4, "attention_bias": False,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "gpt_oss": {"tie_word_embeddings": False, "num_key_value_heads": 8, "head_dim": 64,
                "attention_bias": True, "num_local_experts": 128, "num_experts_per_tok": 4},
    "phimoe": {"tie_word_embeddings": False, "num_key_value_heads": 8, "attention_bias": False,
               "lm_head_bias": False, "num_local_experts": 16, "num_experts_per_tok": 2},
    "nemotron": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                 "hidden_act": "relu2"},
    "glm4": {"tie_word_embeddings": False, "attention_bias": True, "num_key_value_heads": 2,
             "head_dim": 128},
    "glm": {"tie_word_embeddings": False, "attention_bias": True, "num_key_value_heads": 2,
            "head_dim": 128},
    "helium": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
               "num_key_value_heads": 20, "head_dim": 128},
    "exaone4": {"tie_word_embeddings": False, "num_key_value_heads": 32},
    "arcee": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "hidden_act": "relu2"},
    "seed_oss": {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": False,
                 "attention_out_bias": False, "num_key_value_heads": 8, "head_dim": 128},
    "ernie4_5": {"tie_word_embeddings": True, "use_bias": False, "num_key_value_heads": 2,
                 "head_dim": 128},
    "apertus": {"tie_word_embeddings": False, "attention_bias": False, "hidden_act": "xielu"},
}
LLAMA_LIKE = (
    "llama", "granite", "smollm3", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "helium",
    "arcee", "granitemoe", "phimoe", "qwen3_moe", "olmoe", "gpt_oss", "exaone4", "apertus",
)
GEMMA = ("gemma", "gemma2", "gemma3_text")
# fc_in/fc_out (or up/down), no gate
PLAIN_MLP = ("gpt_neox", "gptj", "phi", "falcon", "starcoder2", "bloom", "mpt", "nemotron",
             "arcee", "apertus")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe", "granitemoe", "phimoe")
# Qwen3-MoE's config.json says num_experts and transformers writes num_local_experts: a default
# under one name in FAMILY_DEFAULTS would hide a value under the other, so it is applied last.
DEFAULT_EXPERTS = {"qwen3_moe": 128}
# Families whose q, k and v are one projection (their adapters name one module; a test holds the
# two lists together).
FUSED_QKV = ("gpt_neox", "phi3", "falcon", "bloom", "mpt")
# Families whose attention ignores config.head_dim and always splits d evenly over the heads.
EVEN_HEADS = ("gpt_neox", "gptj", "falcon", "stablelm", "bloom", "mpt")
# An unknown family's own default is unknown; True is BLOOM's, MPT's and transformers v4's.
GENERIC_TIED = True

HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model")
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
FFN = ("intermediate_size", "n_inner", "ffn_hidden_size")
ACTIVATION = ("hidden_activation", "hidden_act", "activation_function", "activation")
# fmt: on


@dataclass(frozen=True)
class Layout:
    """One decoder layer's biases and norms; the defaults are Llama's (no biases, 2 RMSNorms)."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_vectors: int = 1  # d-wide vectors per norm: RMSNorm 1, LayerNorm 2, non-parametric 0
    norms_per_layer: int = 2
    has_attn_norm: bool = True  # OLMo-2 normalises after attention, not before
    has_mlp_norm: bool = False  # parallel blocks only: the FFN has a norm of its own
    qk_norm_weights: int = 0  # per layer: Qwen3/Gemma3 per-head gains, OLMo-2 full-width ones
    small_per_layer: int = 0  # attention sinks (gpt-oss), router biases, xIELU's gains (Apertus)
    shared_expert_hidden: int = 0  # Qwen2-MoE: a gated FFN every token uses, and its gate (d)
    embedding_norm_vectors: int = 0  # BLOOM's LayerNorm on the embedding, before layer 0
    lm_head_bias: bool = False
    is_known: bool = True  # False: an unknown family, counted as a Llama-style layer


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
    layout: Layout  # biases and norms: what an exact count needs beyond the weight matrices

    @property
    def fused_qkv(self) -> bool:
        """q, k and v are one projection (its int8 table gets a scale per head)."""
        return self.model_type in FUSED_QKV

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
        if self.layout.norm_vectors != 1:
            return "LayerNorm" if self.layout.norm_vectors == 2 else "LayerNorm (no weights)"
        return "LayerNorm (no bias)" if self.model_type == "cohere" else "RMSNorm"

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
    generic field names and counted as serial, Llama-style layers (`layout.is_known` is False).
    """
    cfg = _with_defaults(config)
    t = cfg["model_type"]
    d = _required(cfg, HIDDEN)
    n_heads = _required(cfg, HEADS)
    head_dim = _head_dim(cfg, t, d, n_heads)
    n_kv_heads = _kv_heads(cfg, t, n_heads)
    known = t in FAMILY_DEFAULTS
    n_experts = _n_experts(cfg, t, known)
    return ModelDims(
        name=name or str(cfg.get("_name_or_path") or t),
        model_type=t,
        d=d,
        n_layers=_required(cfg, LAYERS),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_hidden=_ffn_hidden(cfg, t, d),
        ffn_matrices=_ffn_matrices(cfg, t, known),
        activation=str(_first(cfg, ACTIVATION) or "silu"),
        n_experts=n_experts,
        experts_per_token=_int(cfg, ("num_experts_per_tok",), default=1) if n_experts > 1 else 1,
        vocab_size=_required(cfg, ("vocab_size",)),
        is_tied=bool(cfg.get("tie_word_embeddings", GENERIC_TIED)),
        is_parallel=is_parallel(cfg),
        layout=_layout(cfg, t, n_heads * head_dim, n_kv_heads * head_dim, head_dim),
    )


def is_parallel(config: Mapping[str, Any] | Any) -> bool:
    """Whether layer 0's attention and FFN both read its input (GPT-J, Pythia, Phi-2, Falcon)."""
    cfg = _with_defaults(config)
    t = cfg["model_type"]
    if HYPOTHETICAL_PARALLEL in cfg:
        return bool(cfg[HYPOTHETICAL_PARALLEL])
    if t in ("gptj", "phi", "cohere", "cohere2"):
        return True
    if t == "falcon":
        # The new decoder architecture (Falcon-40B/180B) is parallel whatever parallel_attn says.
        return bool(cfg["new_decoder_architecture"] or cfg["parallel_attn"])
    if t in ("gpt_neox", "stablelm"):
        return bool(cfg["use_parallel_residual"])
    return False


def check_family(config: Mapping[str, Any]) -> None:
    """Raise unless the config names a family whose layer 0 sees the token alone (see
    `families`)."""
    _with_defaults(config)


# --- reading the config ---------------------------------------------------------------------


def _with_defaults(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config as a plain dict, with the family's defaults under the fields it leaves out."""
    if not isinstance(config, Mapping):
        config = config.to_dict()  # a transformers PretrainedConfig
    t = config.get("model_type")
    if not t:
        raise FirstLayerError(
            "the config has no model_type, so its family is unknown: pass the config.json that "
            'comes with the Hugging Face checkpoint (it names the family, e.g. "llama")'
        )
    refuse_not_applicable(t)
    present = {k: v for k, v in config.items() if v is not None}
    return {**FAMILY_DEFAULTS.get(t, {}), **present}


def _first(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def _int(cfg: Mapping[str, Any], keys: tuple[str, ...], default: int) -> int:
    value = _first(cfg, keys)
    return default if value is None else _checked(keys[0], value)


def _required(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    value = _first(cfg, keys)
    if value is not None:
        return _checked(keys[0], value)
    t, fields = cfg["model_type"], " / ".join(keys)
    if "text_config" in cfg:
        raise FirstLayerError(
            f"the {t} config keeps its language model under text_config: save that section, with "
            "its model_type, as a config.json of its own and pass it"
        )
    raise FirstLayerError(f"the {t} config has no {fields}: pass the config.json that states it")


def _checked(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FirstLayerError(f"config field {key} is {value!r}: it must be a positive integer")
    return value


def _head_dim(cfg: Mapping[str, Any], t: str, d: int, n_heads: int) -> int:
    if t not in EVEN_HEADS and cfg.get("head_dim"):
        return _checked("head_dim", cfg["head_dim"])
    if d % n_heads:
        raise FirstLayerError(
            f"hidden size {d} does not split over {n_heads} heads and the config gives no head_dim:"
            " add head_dim to config.json"
        )
    return d // n_heads


def _kv_heads(cfg: Mapping[str, Any], t: str, n_heads: int) -> int:
    if t == "falcon":
        # Falcon-7B: one K/V head (multi_query); Falcon-40B: num_kv_heads groups; else MHA.
        if cfg["new_decoder_architecture"]:
            return _int(cfg, ("num_kv_heads",), default=n_heads)
        return 1 if cfg["multi_query"] else n_heads
    return _int(cfg, ("num_key_value_heads", "num_kv_heads"), default=n_heads)


def _n_experts(cfg: Mapping[str, Any], t: str, known: bool) -> int:
    if known and t not in MOE:
        return 1
    # Some dense configs write num_experts: 0.
    n = _first(cfg, ("num_local_experts", "num_experts")) or DEFAULT_EXPERTS.get(t, 1)
    return _checked("num_local_experts", n)


def _ffn_matrices(cfg: Mapping[str, Any], t: str, known: bool) -> int:
    if known:
        return 2 if t in PLAIN_MLP else 3
    return 3 if _first(cfg, ACTIVATION) in ("silu", "swish") else 2


def _ffn_hidden(cfg: Mapping[str, Any], t: str, d: int) -> int:
    # GPT-J (n_inner) and Falcon (ffn_hidden_size) read only their own field and leave it out to
    # mean 4d, as the generic Transformer does; MPT states a ratio instead.
    if t == "gptj":
        return _int(cfg, ("n_inner",), default=4 * d)
    if t == "falcon":
        return _int(cfg, ("ffn_hidden_size",), default=4 * d)
    if t in ("bloom", "mpt"):
        return 4 * d  # hard-coded in their MLPs (MPT's expansion_ratio is not read)
    if t in ("qwen2_moe", "qwen3_moe"):
        return _required(cfg, ("moe_intermediate_size",))
    if t not in FAMILY_DEFAULTS:
        ratio = cfg.get("expansion_ratio", 4)
        return _int(cfg, ("moe_intermediate_size", *FFN), default=int(ratio * d))
    return _required(cfg, ("intermediate_size",))


def _layout(cfg: Mapping[str, Any], t: str, q_dim: int, e: int, head_dim: int) -> Layout:
    """Biases and norms of one decoder layer, as each family's modeling file builds them."""
    bias = bool(cfg.get("attention_bias", False))  # q, k, v and o, where a family reads it
    if t == "qwen2":
        return Layout(qkv_bias=True)  # hard-coded, whatever the config says
    if t == "qwen2_moe":
        return Layout(
            qkv_bias=bool(cfg["qkv_bias"]),
            shared_expert_hidden=cfg["shared_expert_intermediate_size"],
        )
    if t in ("glm", "glm4", "seed_oss"):
        # q, k, v biased by attention_bias; o by attention_out_bias (Seed-OSS) or never. GLM-4
        # adds norms after attention and after the FFN.
        o_bias = bool(cfg.get("attention_out_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        return Layout(bias, o_bias, mlp_bias, norms_per_layer=4 if t == "glm4" else 2)
    if t == "ernie4_5":
        b = bool(cfg["use_bias"])
        return Layout(b, b, b)
    if t in LLAMA_LIKE or t not in FAMILY_DEFAULTS:
        mlp_bias = bool(cfg.get("mlp_bias", False))
        return Layout(
            bias,
            bias,
            mlp_bias or t == "gpt_oss",  # gpt-oss: every expert's projections are biased
            norm_vectors=2 if t == "phimoe" else 1,  # LayerNorm
            has_attn_norm=t != "exaone4",  # norms after attention and FFN only
            qk_norm_weights=_qk_norm_weights(t, q_dim, e, head_dim),
            small_per_layer=_small_per_layer(cfg, t),
            lm_head_bias=bool(cfg.get("lm_head_bias", False)),
            is_known=t in FAMILY_DEFAULTS,
        )
    if t in GEMMA:
        # Gemma 2 and 3 add norms after attention and around the FFN; Gemma 3 norms q and k.
        qk = 2 * head_dim if t == "gemma3_text" else 0
        return Layout(bias, bias, norms_per_layer=2 if t == "gemma" else 4, qk_norm_weights=qk)
    if t == "olmo":
        return Layout(bias, bias, norm_vectors=0)  # LayerNorm without weights
    if t in ("olmo2", "olmo3"):
        # Norms after attention and FFN, and q/k normalised over their full width.
        return Layout(bias, bias, has_attn_norm=False, qk_norm_weights=q_dim + e)
    if t in ("cohere", "cohere2"):
        # One bias-free LayerNorm feeds attention and FFN; q/k norms have a gain per head.
        qk = (q_dim + e) * bool(cfg.get("use_qk_norm", False))
        return Layout(bias, bias, norms_per_layer=1, qk_norm_weights=qk)
    if t == "bloom":
        return Layout(True, True, True, norm_vectors=2, embedding_norm_vectors=2)
    if t == "mpt":
        b = not cfg["no_bias"]  # biases everywhere, norms included, unless no_bias
        return Layout(b, b, b, norm_vectors=1 + b)
    if t == "nemotron":
        # LayerNorm1P: gain and bias; o_proj biased with q, k and v.
        return Layout(bias, bias, bool(cfg["mlp_bias"]), norm_vectors=2)
    if t == "stablelm":
        # Parallel blocks drop post_attention_layernorm; q/k norms are one LayerNorm per head.
        norms = 1 if cfg["use_parallel_residual"] else 2
        qk = (q_dim + e) * cfg["qk_layernorm"]
        return Layout(
            cfg["use_qkv_bias"], norm_vectors=2, norms_per_layer=norms, qk_norm_weights=qk
        )
    if t == "starcoder2":
        b = bool(cfg["use_bias"])
        return Layout(b, b, b, norm_vectors=2)
    if t == "gpt_neox":
        # Both norms exist either way; parallel blocks feed the MLP post_attention_layernorm(x).
        parallel = bool(cfg["use_parallel_residual"])
        return Layout(bias, bias, True, norm_vectors=2, has_mlp_norm=parallel)
    if t == "gptj":
        return Layout(mlp_bias=True, norm_vectors=2, norms_per_layer=1, lm_head_bias=True)
    if t == "phi":
        qk = 4 * head_dim * cfg["qk_layernorm"]  # LayerNorm(head_dim), weight and bias, q and k
        return Layout(True, True, True, 2, 1, qk_norm_weights=qk, lm_head_bias=True)
    if t == "falcon":
        # Two norms when serial, or parallel with num_ln_in_parallel_attn == 2 (the new decoder
        # architecture's default); one shared norm otherwise.
        b, parallel = bool(cfg["bias"]), is_parallel(cfg)
        n_ln = cfg.get("num_ln_in_parallel_attn") or (2 if cfg["new_decoder_architecture"] else 1)
        two = not parallel or n_ln == 2
        return Layout(b, b, b, 2, 2 if two else 1, has_mlp_norm=parallel and two)
    raise AssertionError(f"no layout for known family {t}")


def _qk_norm_weights(t: str, q_dim: int, e: int, head_dim: int) -> int:
    if t in ("qwen3", "qwen3_moe", "exaone4", "apertus"):
        return 2 * head_dim  # one RMSNorm(head_dim) for q, one for k
    if t == "olmoe":
        return q_dim + e  # over the full width, as OLMo 2
    return 0


def _small_per_layer(cfg: Mapping[str, Any], t: str) -> int:
    if t == "gpt_oss":
        return _required(cfg, HEADS) + _int(cfg, ("num_local_experts",), 1)  # sinks, router bias
    if t == "apertus":
        return 2  # xIELU's alpha_p and alpha_n
    return 0
