"""dims: shapes from a config dict alone, each family's defaults, and the refused families."""

from __future__ import annotations

import pytest

from firstlayer.analysis.dims import ModelDims, is_parallel, model_dims
from firstlayer.errors import FirstLayerError
from firstlayer.families import SUPPORTED_TYPES, family_of

# Each declaration's config defaults, by model type.
FAMILY_DEFAULTS = {t: family_of(t).defaults[t] for t in SUPPORTED_TYPES}

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=256,
)


def test_gqa_mistral_widths():
    m = model_dims(dict(model_type="mistral", **TINY, num_key_value_heads=2))
    assert (m.head_dim, m.q_dim, m.e, m.attention) == (16, 64, 32, "GQA")
    assert (m.ffn_type, m.ffn_matrices, m.is_parallel, m.is_tied) == ("SwiGLU", 3, False, False)


def test_mqa_falcon_multi_query_has_one_kv_head():
    m = model_dims(
        dict(
            model_type="falcon",
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=256,
        )
    )  # multi_query defaults to True
    assert (m.n_kv_heads, m.e, m.attention) == (1, 16, "MQA")
    assert m.is_parallel and m.is_tied  # Falcon defaults: parallel_attn, tied embeddings
    assert (m.ffn_hidden, m.ffn_type) == (256, "2-layer MLP")  # ffn_hidden_size left out: 4d


def test_falcon_new_decoder_architecture_uses_num_kv_heads_and_two_norms():
    m = model_dims(
        dict(
            model_type="falcon",
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=256,
            new_decoder_architecture=True,
            num_kv_heads=2,
            parallel_attn=False,
        )
    )
    assert (m.n_kv_heads, m.attention, m.is_parallel, m.extras.has_mlp_norm) == (
        2,
        "GQA",
        True,
        True,
    )


def test_gemma_head_dim_is_not_d_over_heads():
    # Gemma-7B: d = 3072, 16 heads of 256, so q_dim = 4096 and the row is d + q_dim + 2e wide.
    m = model_dims(
        dict(
            model_type="gemma",
            hidden_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            intermediate_size=24576,
            vocab_size=256000,
        )
    )
    assert (m.head_dim, m.q_dim, m.e, m.n_kv_heads) == (256, 4096, 4096, 16)
    assert (m.is_tied, m.ffn_type) == (True, "GeGLU")


def test_mixtral_experts_and_top_k():
    m = model_dims(dict(model_type="mixtral", **TINY, num_local_experts=4, num_experts_per_tok=2))
    assert (m.n_experts, m.experts_per_token, m.ffn_type) == (4, 2, "SwiGLU MoE")


def test_gptj_reads_its_own_field_names():
    m = model_dims(dict(model_type="gptj", n_embd=64, n_layer=3, n_head=4, vocab_size=256))
    assert (m.d, m.n_layers, m.n_heads, m.ffn_hidden) == (64, 3, 4, 256)
    assert m.is_parallel and m.extras.lm_head_bias


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dict(model_type="gptj"), True),
        (dict(model_type="phi"), True),
        (dict(model_type="cohere"), True),
        (dict(model_type="falcon"), True),
        (dict(model_type="falcon", parallel_attn=False), False),
        (dict(model_type="falcon", parallel_attn=False, new_decoder_architecture=True), True),
        (dict(model_type="gpt_neox"), True),
        (dict(model_type="gpt_neox", use_parallel_residual=False), False),
        (dict(model_type="stablelm"), False),
        (dict(model_type="stablelm", use_parallel_residual=True), True),
        *(
            (dict(model_type=t), False)
            for t in (
                "llama",
                "mistral",
                "mixtral",
                "qwen2",
                "qwen3",
                "gemma",
                "gemma2",
                "gemma3_text",
                "phi3",
                "olmo",
                "olmo2",
                "some_new_family",
            )
        ),
    ],
)
def test_is_parallel(config, expected):
    assert is_parallel(config) is expected


def test_is_parallel_accepts_a_transformers_config():
    import transformers

    assert is_parallel(transformers.GPTNeoXConfig(use_parallel_residual=False)) is False
    assert is_parallel(transformers.FalconConfig()) is True


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "gpt_neo", "whisper", "bert", "xglm"])
def test_absolute_position_families_are_refused_with_the_reason(model_type):
    with pytest.raises(FirstLayerError) as error:
        model_dims(dict(model_type=model_type, **TINY))
    message = str(error.value)
    assert message.startswith(f"{model_type} adds a ")
    assert "absolute position embedding" in message and "RoPE, ALiBi" in message
    assert "\n" not in message


def test_alibi_families_are_not_refused():
    m = model_dims(dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=256))
    assert (m.d, m.ffn_hidden, m.ffn_matrices, m.extras.is_known) == (64, 256, 2, True)
    assert model_dims(dict(model_type="falcon", alibi=True, **TINY)).is_parallel


def test_missing_model_type_names_the_fix():
    with pytest.raises(FirstLayerError, match="no model_type.*config.json"):
        model_dims(dict(TINY))


def test_missing_hidden_size_names_the_field():
    config = dict(TINY, model_type="llama")
    del config["hidden_size"]
    with pytest.raises(FirstLayerError, match="hidden_size"):
        model_dims(config)


def test_glu_family_without_intermediate_size_is_an_error():
    config = dict(TINY, model_type="qwen2")
    del config["intermediate_size"]
    with pytest.raises(FirstLayerError, match="intermediate_size"):
        model_dims(config)


def test_unknown_family_falls_back_to_generic_names_and_serial():
    m = model_dims(
        dict(
            model_type="brand_new",
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=256,
            hidden_act="silu",
        )
    )
    assert (m.d, m.ffn_hidden, m.ffn_matrices, m.is_parallel) == (64, 256, 3, False)
    assert not m.extras.is_known


@pytest.mark.parametrize("model_type", sorted(FAMILY_DEFAULTS))
def test_family_defaults_match_transformers(model_type):
    import transformers

    full = transformers.AutoConfig.for_model(model_type).to_dict()
    for key, value in FAMILY_DEFAULTS[model_type].items():
        assert full[key] == value, key


@pytest.mark.parametrize("model_type", sorted(FAMILY_DEFAULTS))
def test_short_config_reads_like_the_full_one(model_type):
    # config.json files written by older transformers leave default fields out.
    import transformers

    dims = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=256,
    )
    if model_type == "gptj":
        dims = dict(n_embd=64, n_head=4, n_layer=2, vocab_size=256)
    full = transformers.AutoConfig.for_model(model_type, **dims).to_dict()
    short = dict(dims, model_type=model_type)
    assert model_dims(short, "m") == model_dims(full, "m")


def test_dims_are_frozen():
    m = model_dims(dict(model_type="llama", **TINY))
    assert isinstance(m, ModelDims)
    with pytest.raises(AttributeError):
        m.d = 1  # type: ignore[misc]
