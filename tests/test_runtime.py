"""precompute(): the same function as the original model, for every family and generate() mode."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch

from firstlayer import precompute
from firstlayer.errors import FirstLayerError
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE

NEW_TOKENS = 32


def masked_max_diff(a, b, mask) -> float:
    return ((a - b).abs() * mask[..., None]).max().item()


def test_logits_match_original_on_left_padded_batch(tiny):
    original = clone(tiny)
    model = precompute(tiny)
    batch = left_padded_batch(original.config.vocab_size)
    with torch.inference_mode():
        expected = original(**batch).logits
        actual = model(**batch).logits
    assert masked_max_diff(expected, actual, batch["attention_mask"]) <= FLOAT32_LOGIT_TOLERANCE


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=4),
        dict(do_sample=False, cache_implementation="static"),
        dict(do_sample=True, temperature=0.9, top_k=20),
    ],
    ids=["greedy", "beam4", "static_cache", "sampling"],
)
def test_generate_matches_original(tiny, settings):
    original = clone(tiny)
    model = precompute(tiny)
    batch = left_padded_batch(original.config.vocab_size)
    common = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    torch.manual_seed(5)
    expected = original.generate(**batch, **common, **settings)
    torch.manual_seed(5)
    actual = model.generate(**batch, **common, **settings)
    assert actual.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(expected, actual)


def test_eliminated_weights_are_gone(tiny):
    model = precompute(tiny)
    record = model.config.firstlayer
    names = {name for name, _ in model.named_parameters()}
    for module in record["eliminated"]:
        assert not any(name.startswith(module + ".") for name in names), module
    width = record["table"]["width"]
    assert model.get_input_embeddings().table().shape == (model.config.vocab_size, width)


def test_tied_lm_head_reads_the_table_x_block_not_a_copy():
    family = next(f for f in FAMILIES if f.id == "gemma")  # tied, and x scaled by sqrt(D)
    model = precompute(build_tiny(family))
    residual = model.get_input_embeddings().residual
    lm_head = model.get_output_embeddings().weight
    assert lm_head is residual and lm_head.is_contiguous()
    assert lm_head.shape == (model.config.vocab_size, model.config.hidden_size)
    # Stored and counted once, like a tied embedding.
    assert sum(p is residual for p in model.parameters()) == 1
    assert set(model.state_dict()) >= {"lm_head.weight", "model.embed_tokens.residual"}
    model.tie_weights()  # a re-tie must not point the LM head at anything else
    assert model.get_output_embeddings().weight.shape == lm_head.shape


def test_tied_parallel_model_keeps_the_plain_embedding_for_the_lm_head():
    family = next(f for f in FAMILIES if f.id == "falcon")
    original = build_tiny(family)
    embedding = original.get_input_embeddings().weight.detach().clone()
    model = precompute(original)
    assert torch.equal(model.get_output_embeddings().weight, embedding)


@pytest.mark.parametrize("family_id", ["gemma", "gpt_neox"])
def test_hidden_states_zero_is_what_layer_zero_receives(family_id):
    """Serial: E[t] (Gemma: scaled by sqrt(D)), as before. Parallel: E[t] + mlp(n2(E[t])), the
    row's first D columns. Every later hidden state is unchanged."""
    family = next(f for f in FAMILIES if f.id == family_id)
    original = build_tiny(family)
    model = precompute(clone(original))
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        before = original(input_ids=ids, output_hidden_states=True).hidden_states
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(before) == len(after)
    torch.testing.assert_close(after[1:], before[1:], atol=1e-5, rtol=1e-5)
    if model.config.firstlayer["architecture"] == "serial":
        torch.testing.assert_close(after[0], before[0])
    else:
        residual = model.get_input_embeddings().residual
        assert torch.equal(after[0][0], residual[ids[0]])


def test_inputs_embeds_are_refused_with_a_clear_error(tiny):
    model = precompute(tiny)
    embeds = torch.zeros(1, 3, model.config.hidden_size)
    with pytest.raises(FirstLayerError, match="token ids only, not inputs_embeds"):
        model(inputs_embeds=embeds)


def test_token_ids_outside_the_vocabulary_are_refused_as_a_user_error(tiny):
    model = precompute(tiny)
    vocab_size = model.config.vocab_size
    with pytest.raises(FirstLayerError, match=f"token id {vocab_size} is outside the vocabulary"):
        model(input_ids=torch.tensor([[1, vocab_size]]))
    with pytest.raises(FirstLayerError, match="token id -1 is outside"):
        model(input_ids=torch.tensor([[-1, 2]]))


def test_precomputing_twice_is_refused(tiny):
    model = precompute(tiny)
    with pytest.raises(FirstLayerError, match="precomputed already"):
        precompute(model)


def test_absolute_position_models_are_refused_with_the_reason():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(FirstLayerError, match="position"):
        precompute(AutoModelForCausalLM.from_config(config))


def test_bfloat16_model_table_is_built_in_float32(tiny):
    """A bf16 model's rows are float32 arithmetic on its bf16 weights, rounded once to bf16."""
    model_bf16 = tiny.to(torch.bfloat16)
    reference = precompute(clone(model_bf16).float()).get_input_embeddings().table()
    table = precompute(model_bf16).get_input_embeddings().table()
    assert table.dtype == torch.bfloat16
    assert torch.equal(table, reference.to(torch.bfloat16))


def test_a_host_kept_block_gives_the_rows_a_device_kept_one_gives():
    """The one lookup both engines use: a gather, int8 rows times their segment's scale, and for
    a block kept in host memory the same rows carried over."""
    from firstlayer.table.codec import column_segments, quantize_int8
    from firstlayer.table.lookup import HostStaging, gather_rows

    table = torch.randn(32, 12)
    ranges = ((0, 4), (4, 8), (8, 12))
    codes, scales = quantize_int8(table, ranges)
    segment = column_segments(ranges)
    ids = torch.tensor([[3, 31, 0], [7, 7, 1]])
    staging = HostStaging()
    for dtype in (torch.float32, torch.bfloat16):
        rows = gather_rows(table, ids, dtype, staging=staging)
        assert rows.dtype == dtype and torch.equal(rows, table[ids].to(dtype))
        int8_rows = gather_rows(codes, ids, dtype, scales, segment, staging)
        expected = (codes[ids].float() * scales[ids].repeat_interleave(4, dim=-1)).to(dtype)
        assert torch.equal(int8_rows, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("table_dtype", [None, torch.int8])
def test_a_forward_on_cuda_never_waits_for_the_device(table_dtype):
    """What firstlayer adds to a step on CUDA (the id check, the lookups, the hooks) queues
    work and never synchronizes: torch refuses any sync while the debug mode is "error"."""
    from firstlayer.hf.patch import refuse_ids_outside_table

    family = next(f for f in FAMILIES if f.id == "llama")
    model = precompute(build_tiny(family), dtype=table_dtype).cuda()
    table = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), device="cuda")
    table(ids), table.rows(ids)  # segments and caches settle on the device first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        refuse_ids_outside_table(ids, table.num_embeddings)
        table(ids), table.rows(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_rows_cross_to_cuda_through_reused_pinned_buffers():
    from firstlayer.table.lookup import HostStaging

    staging, rows = HostStaging(), torch.randn(4, 8)
    outputs = [staging.to_device(rows * i, torch.float32, torch.device("cuda")) for i in range(6)]
    buffers = [slot.buffer.data_ptr() for slot in staging._local.slots]
    assert all(slot.buffer.is_pinned() for slot in staging._local.slots)
    for i, out in enumerate(outputs):  # every copy read its own rows, none overwritten
        assert torch.equal(out.cpu(), rows * i)
    staging.to_device(rows, torch.float32, torch.device("cuda"))
    assert [slot.buffer.data_ptr() for slot in staging._local.slots] == buffers
