"""savings: the paper's arithmetic, exact counts against transformers, and the 1/L bound."""

from __future__ import annotations

import pytest

from firstlayer.analysis.dims import model_dims
from firstlayer.analysis.savings import DEFAULT_BATCHES, analyze, analyze_specs
from firstlayer.analysis.sources import PRESETS
from firstlayer.hf.patch import parts_of

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=256,
    pad_token_id=0,
)

# Each case: model_type, config overrides, where layer 0 lives, and the layer-0 modules the
# converter removes (attention input norm, Q/K/V; parallel blocks: q/k norms, MLP norm and MLP;
# a serial block keeps its q/k norms, which run on the table's q/k columns).
LLAMA_LIKE_QKV = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
CASES = {
    "llama": ("llama", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "llama-biases": (
        "llama",
        dict(attention_bias=True, mlp_bias=True),
        "model.layers.0.",
        LLAMA_LIKE_QKV,
    ),
    "mistral": ("mistral", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "mixtral": (
        "mixtral",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "model.layers.0.",
        LLAMA_LIKE_QKV,
    ),
    "qwen2": ("qwen2", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "qwen3": (
        "qwen3",
        dict(num_key_value_heads=2, head_dim=32),
        "model.layers.0.",
        LLAMA_LIKE_QKV,
    ),
    "gemma": ("gemma", dict(num_key_value_heads=1, head_dim=32), "model.layers.0.", LLAMA_LIKE_QKV),
    "gemma2": (
        "gemma2",
        dict(num_key_value_heads=2, head_dim=32),
        "model.layers.0.",
        LLAMA_LIKE_QKV,
    ),
    "gemma3_text": (
        "gemma3_text",
        dict(num_key_value_heads=2, head_dim=32),
        "model.layers.0.",
        LLAMA_LIKE_QKV,
    ),
    "phi3": (
        "phi3",
        dict(num_key_value_heads=2),
        "model.layers.0.",
        ("input_layernorm", "self_attn.qkv_proj"),
    ),
    "granite": ("granite", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "smollm3": ("smollm3", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "olmo": ("olmo", dict(), "model.layers.0.", LLAMA_LIKE_QKV),
    "olmo2": (
        "olmo2",
        dict(num_key_value_heads=2),
        "model.layers.0.",
        LLAMA_LIKE_QKV[1:],
    ),
    "starcoder2": ("starcoder2", dict(), "model.layers.0.", LLAMA_LIKE_QKV),
    "stablelm": ("stablelm", dict(num_key_value_heads=2), "model.layers.0.", LLAMA_LIKE_QKV),
    "stablelm-parallel": (
        "stablelm",
        dict(
            num_key_value_heads=2, use_parallel_residual=True, qk_layernorm=True, use_qkv_bias=True
        ),
        "model.layers.0.",
        LLAMA_LIKE_QKV + ("self_attn.q_layernorm", "self_attn.k_layernorm", "mlp"),
    ),
    "cohere": (
        "cohere",
        dict(num_key_value_heads=2, use_qk_norm=True),
        "model.layers.0.",
        LLAMA_LIKE_QKV + QK_NORMS + ("mlp",),
    ),
    "gpt_neox-parallel": (
        "gpt_neox",
        dict(use_parallel_residual=True),
        "gpt_neox.layers.0.",
        ("input_layernorm", "attention.query_key_value", "post_attention_layernorm", "mlp"),
    ),
    "gpt_neox-serial": (
        "gpt_neox",
        dict(use_parallel_residual=False),
        "gpt_neox.layers.0.",
        ("input_layernorm", "attention.query_key_value"),
    ),
    "gptj": (
        "gptj",
        dict(rotary_dim=8),
        "transformer.h.0.",
        ("ln_1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp"),
    ),
    "phi": ("phi", dict(), "model.layers.0.", LLAMA_LIKE_QKV + ("mlp",)),
    "phi-qk-layernorm": (
        "phi",
        dict(qk_layernorm=True),
        "model.layers.0.",
        LLAMA_LIKE_QKV + ("self_attn.q_layernorm", "self_attn.k_layernorm", "mlp"),
    ),
    "falcon-multi-query": (
        "falcon",
        dict(multi_query=True),
        "transformer.h.0.",
        ("input_layernorm", "self_attention.query_key_value", "mlp"),
    ),
    "falcon-new-decoder": (
        "falcon",
        dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
        "transformer.h.0.",
        ("ln_attn", "self_attention.query_key_value", "ln_mlp", "mlp"),
    ),
    "falcon-serial": (
        "falcon",
        dict(multi_query=False, parallel_attn=False),
        "transformer.h.0.",
        ("input_layernorm", "self_attention.query_key_value"),
    ),
}


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny random transformers models, built once for the module."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    models = {}
    for case, (model_type, extra, _, _) in CASES.items():
        config = transformers.AutoConfig.for_model(model_type, **TINY, **extra)
        models[case] = transformers.AutoModelForCausalLM.from_config(config)
    return models


@pytest.mark.parametrize("case", CASES)
def test_exact_total_weights_match_transformers(tiny_models, case):
    model = tiny_models[case]
    analysis = analyze(model.config.to_dict(), "exact")
    assert analysis.total_weights == sum(p.numel() for p in model.parameters())
    assert analysis.dims.extras.is_known


@pytest.mark.parametrize("case", CASES)
def test_exact_eliminated_weights_are_layer0_token_local_parameters(tiny_models, case):
    _, _, prefix, modules = CASES[case]
    model = tiny_models[case]
    names = tuple(f"{prefix}{m}." for m in modules)
    expected = sum(p.numel() for n, p in model.named_parameters() if n.startswith(names))
    analysis = analyze(model.config.to_dict(), "exact")
    assert analysis.eliminated_weights == expected
    # A serial model's table module keeps layer 0's attention norm (for adapters): not read
    # per step, still stored.
    parts, parallel = parts_of(model)
    kept = (
        0
        if parallel or parts.attn_norm is None
        else sum(p.numel() for p in model.get_submodule(parts.attn_norm).parameters())
    )
    assert analysis.memory.decrease == expected - kept


@pytest.mark.parametrize("case", CASES)
def test_exact_row_width_is_d_plus_q_dim_plus_two_e(tiny_models, case):
    model = tiny_models[case]
    m = model_dims(model.config.to_dict())
    attention = model.get_submodule(CASES[case][2].rstrip("."))
    # The q, k, v output widths, from the real modules: one fused matrix or three.
    qkv = sum(
        mod.out_features
        for name, mod in attention.named_modules()
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value")
    )
    assert qkv == m.q_dim + 2 * m.e
    assert analyze(m, "exact").row_width == m.d + qkv


def test_paper_reads_and_memory_by_hand():
    # Mistral-7B: serial GQA, row = d + q_dim + 2e = 4096 + 4096 + 2 * 1024.
    a = analyze("mistral-7b")
    assert a.row_width == 10_240
    assert a.eliminated_weights == 4096 * (4096 + 2 * 1024)
    assert a.reads[0].without == 4096 + a.eliminated_weights
    assert a.reads[0].with_ == 10_240
    assert a.memory.increase == (10_240 - 4096) * 32_000
    assert a.memory.net == a.memory.increase - a.eliminated_weights


def test_mqa_and_wide_heads_by_hand():
    # Falcon-7B style MQA: one K/V head of 16, so the row is d + d + 2 * 16; parallel, so the
    # 4d MLP goes too.
    mqa = analyze(
        dict(
            model_type="falcon",
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=256,
        )
    )
    assert mqa.row_width == 64 + 64 + 2 * 16
    assert mqa.eliminated_weights == 64 * (64 + 2 * 16) + 2 * 64 * 256
    # Gemma: 4 heads of 32 on d = 64, so q_dim = 128 and the row is wider than 2(d + e).
    gemma = analyze(dict(model_type="gemma", **TINY, head_dim=32, num_key_value_heads=1))
    assert gemma.row_width == 64 + 128 + 2 * 32
    assert gemma.layer.q_p == 2 * 64 * 128


def test_paper_counts_every_expert_and_no_router():
    a = analyze("mixtral-8x7b-parallel")
    assert a.dims.is_parallel
    assert a.eliminated_weights == 1_434_451_968
    assert a.layer.ffn == 8 * 3 * 4096 * 14_336


def test_exact_moe_reads_expected_distinct_experts():
    # A parallel 4-expert top-2 model: a batch of B reads 4 * (1 - (1/2)^B) experts per layer.
    config = dict(
        model_type="mixtral",
        firstlayer_hypothetical_parallel=True,
        **TINY,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    a = analyze(config, "exact", batches=(1, 2, 3))
    expert = 3 * 64 * 128
    attention = 64 + 64 * (64 + 2 * 32)  # input norm + q, k, v
    router = 4 * 64
    for r in a.reads:
        distinct = 4 * (1 - 0.5**r.batch)
        assert r.without == round(r.batch * 64 + attention + router + distinct * expert)
    assert a.reads[0].without == 64 + attention + router + 2 * expert  # batch 1: exactly k
    assert a.eliminated_weights == attention + router + 4 * expert  # memory: every expert goes
    saved_flops = a.flops_per_token(False) - a.flops_per_token(True)
    assert saved_flops == 2 * (attention + router + 2 * expert)  # FLOPs: k experts per token


def test_exact_tied_memory_serial_view_and_parallel_keeps_embedding():
    serial = analyze(dict(model_type="gemma", **TINY, head_dim=32, num_key_value_heads=1), "exact")
    assert serial.dims.is_tied and not serial.dims.is_parallel
    assert serial.memory.increase == (serial.row_width - 64) * 256
    parallel = analyze(dict(model_type="falcon", **TINY), "exact")
    assert parallel.dims.is_tied and parallel.dims.is_parallel
    assert parallel.memory.increase == parallel.row_width * 256
    # The paper's accounting ignores the tied parallel case.
    assert (
        analyze(dict(model_type="falcon", **TINY)).memory.increase
        == (parallel.row_width - 64) * 256
    )


def test_weights_read_per_step_by_hand():
    a = analyze(dict(model_type="llama", **TINY), "exact")  # MHA, untied, no biases
    layer = 2 * 64 * 64 + 2 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # Q+P, K+V, SwiGLU, 2 RMSNorms
    head = 256 * 64
    for b in (1, 7, 300):
        without = 2 * layer + 64 + head + b * 64
        assert a.weights_read_per_step(b, False) == without
        eliminated = 64 + 3 * 64 * 64
        assert a.weights_read_per_step(b, True) == without - eliminated - b * 64 + b * 256
        assert a.decode_ceiling(b) == without / a.weights_read_per_step(b, True)
    assert a.flops_per_token(False) == 2 * (2 * layer + 64 + head)
    assert a.prefill_ceiling(1) == a.prefill_ceiling(4096)
    # A prompt of T tokens runs the LM head once (logits at the last position only).
    body, saved = 2 * (2 * layer + 64), 2 * (64 + 3 * 64 * 64)
    for tokens in (1, 32):
        without = tokens * body + 2 * head
        assert a.prefill_flops(tokens, False) == without
        assert a.prefill_ceiling(1, tokens) == without / (without - tokens * saved)
    assert a.prefill_ceiling(1, 1) == a.prefill_ceiling(1)
    assert a.prefill_ceiling(1, 32) > a.prefill_ceiling(1)
    assert 1 - 1 / a.prefill_ceiling(1, 10**6) <= a.max_saving


BOUND_CASES = [*PRESETS, "default"]


@pytest.mark.parametrize("accounting", ["paper", "exact"])
@pytest.mark.parametrize("spec", BOUND_CASES)
def test_whole_model_saving_never_exceeds_one_layer(spec, accounting):
    a = analyze(spec, accounting, batches=(1, 2, 16, 256, 1024, 65536))
    for b in a.batches:
        assert 1 - a.weights_read_per_step(b, True) / a.weights_read_per_step(b, False) <= (
            1 / a.dims.n_layers
        )
    assert 1 - a.flops_per_token(True) / a.flops_per_token(False) <= 1 / a.dims.n_layers


def test_shallow_parallel_model_saves_more_than_deep_serial():
    shallow = analyze(dict(model_type="gptj", n_embd=256, n_layer=4, n_head=4, vocab_size=512))
    deep = analyze("mistral-7b")
    assert 1 - 1 / shallow.decode_ceiling(1) > 0.1  # near the 25% bound of 4 layers
    assert 1 - 1 / deep.decode_ceiling(1) < 0.01


def test_paper_word_gives_each_table_its_models():
    report = analyze_specs(["paper"])
    assert [a.name for a in report.config_models] == ["Pythia-6.9B", "Mistral-7B", "Mixtral-8x7B"]
    assert [a.name for a in report.savings_models][-1] == "Mixtral-8x7B parallel"
    assert len(report.models) == 4
    assert report.models[0].batches == DEFAULT_BATCHES


@pytest.mark.parametrize("batches", [(), (0,), (-3,), (1.5,)])
def test_bad_batches_are_refused(batches):
    from firstlayer.errors import FirstLayerError

    with pytest.raises(FirstLayerError, match="batch sizes"):
        analyze("mistral-7b", batches=batches)
