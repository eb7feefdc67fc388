"""A precomputed model keeps transformers' conventions for any model, checked as transformers' own
ModelTesterMixin does: moving devices and dtypes after loading (every table placement), loading
from a state dict without a folder, leaving the caller's config alone, resizing embeddings.

No accelerator here: `.to("meta")` stands in for a second device where a test checks what moves
and what stays on the host, and the CUDA moves run where there is one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone, left_padded_batch

from firstlayer.conversion import convert, precompute
from firstlayer.errors import FirstLayerError
from firstlayer.hf.loading import load
from firstlayer.table.lookup import TABLE_MEMORY

# A serial family with a tied LM head, and a parallel one (its residual block is a table block).
FAMILY_IDS = ("llama", "gpt_neox")
MOVES: dict[str, tuple[Callable, torch.dtype]] = {
    'to("cpu")': (lambda m: m.to("cpu"), torch.float32),
    "cpu()": (lambda m: m.cpu(), torch.float32),
    'to(torch.device("cpu"))': (lambda m: m.to(torch.device("cpu")), torch.float32),
    "float()": (lambda m: m.float(), torch.float32),
    "half()": (lambda m: m.half(), torch.float16),
    "to(torch.bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    'to("cpu", torch.bfloat16)': (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
    "to(device=, dtype=)": (lambda m: m.to(device="cpu", dtype=torch.float16), torch.float16),
    "half().float()": (lambda m: m.half().float(), torch.float32),
}
# What a float32 model cast to a 16-bit dtype may move a logit by, on these tiny models.
CAST_TOLERANCE = 0.1


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple]:
    """Per family: the original, its converted folder (float32 table) and an int8-table folder."""
    root = tmp_path_factory.mktemp("conventions")
    out = {}
    for family_id in FAMILY_IDS:
        original = build_tiny(family(family_id))
        folder = convert(clone(original), root / family_id)
        int8 = convert(clone(original), root / f"{family_id}-int8", table_dtype="int8")
        out[family_id] = (original, folder, int8)
    return out


def host_blocks_in_place(table) -> dict[str, tuple[int, torch.dtype, torch.device]]:
    return {
        name: (
            getattr(table, name).data_ptr(),
            getattr(table, name).dtype,
            getattr(table, name).device,
        )
        for name in table.host_blocks
    }


def expected_logits(original, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return clone(original).to(dtype)(**batch).logits.float()


def assert_same_logits(
    model, original, batch: dict, dtype: torch.dtype, lossy: bool = False
) -> None:
    """The original's logits in `dtype`; `lossy`: the model went through a 16-bit dtype."""
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 and not lossy else CAST_TOLERANCE
    assert (logits.float() - expected_logits(original, batch, dtype)).abs().max() < tolerance


@pytest.mark.parametrize("family_id", FAMILY_IDS)
@pytest.mark.parametrize("memory", TABLE_MEMORY)
@pytest.mark.parametrize("move", MOVES, ids=list(MOVES))
def test_a_loaded_model_moves_and_casts_like_any_model(converted, family_id, memory, move):
    """`.to`, `.cpu()`, `.half()`, `.float()` after from_pretrained: the table's host-kept blocks
    stay where they are (the same memory, in their stored dtype), the rows follow the model's
    dtype, and the logits are the original's moved the same way."""
    original, folder, _ = converted[family_id]
    apply, dtype = MOVES[move]
    model = load(folder, table_memory=memory)
    table = model.get_input_embeddings()
    kept = host_blocks_in_place(table)
    assert apply(model) is model
    assert host_blocks_in_place(table) == kept
    assert table.dtype == dtype
    batch = left_padded_batch(original.config.vocab_size)
    assert_same_logits(model, original, batch, dtype, lossy="half" in move)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_plain_transformers_loads_then_moves_with_a_device_map(converted, family_id):
    from transformers import AutoModelForCausalLM

    original, folder, _ = converted[family_id]
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").to("cpu")
    model = model.to(torch.bfloat16).to("cpu", torch.float32)
    batch = left_padded_batch(original.config.vocab_size)
    assert_same_logits(model, original, batch, torch.float32, lossy=True)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
@pytest.mark.parametrize("memory", TABLE_MEMORY)
def test_the_placement_rule_on_a_move_to_another_device(converted, family_id, memory):
    """What moves to the model's device and what stays on the host, with the meta device as the
    other device: host-kept blocks and their scales stay; every other block moves, int8 scales
    in float32."""
    _, _, folder = converted[family_id]
    model = load(folder, table_memory=memory).to("meta")
    table = model.get_input_embeddings()
    expected_host = (
        set()
        if memory == "device"
        else (
            {"qkv", "qkv_scale"}
            | ({"residual", "residual_scale"} if family_id == "gpt_neox" else set())
        )
    )
    assert table.host_blocks == expected_host
    for name, parameter in table.named_parameters(recurse=False):
        assert parameter.device.type == ("cpu" if name in expected_host else "meta"), name
        if name.endswith("_scale"):
            assert parameter.dtype == torch.float32, name
    in_table = {id(p) for p in table.parameters()}
    assert all(p.device.type == "meta" for p in model.parameters() if id(p) not in in_table)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_a_model_precomputed_in_place_moves_and_round_trips_through_a_folder(
    converted, family_id, tmp_path
):
    """precompute -> .to -> save_pretrained -> from_pretrained -> .to: the original's logits at
    every step, and generate's greedy tokens after the last move."""
    from transformers import AutoModelForCausalLM

    original = converted[family_id][0]
    batch = left_padded_batch(original.config.vocab_size)
    model = precompute(clone(original)).to("cpu")
    assert_same_logits(model, original, batch, torch.float32)
    model.save_pretrained(tmp_path / "saved")
    assert_same_logits(model.to(torch.bfloat16), original, batch, torch.bfloat16)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_tokens = clone(original).generate(**batch, **settings)
    for memory in TABLE_MEMORY:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", table_memory=memory)
        loaded = loaded.to("cpu")
        assert_same_logits(loaded, original, batch, torch.float32)
        assert torch.equal(loaded.generate(**batch, **settings), expected_tokens)
        loaded = loaded.half().to(torch.float32)
        assert_same_logits(loaded, original, batch, torch.float32, lossy=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory", TABLE_MEMORY)
def test_a_loaded_model_moves_to_cuda_and_back(converted, memory):
    original, folder, _ = converted["llama"]
    batch = left_padded_batch(original.config.vocab_size)
    model = load(folder, table_memory=memory).cuda()
    with torch.no_grad():
        logits = model(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    assert (logits - expected_logits(original, batch, torch.float32)).abs().max() < 1e-4
    assert_same_logits(model.cpu(), original, batch, torch.float32)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_from_pretrained_without_a_folder_takes_a_config_and_a_state_dict(converted, family_id):
    """As ModelTesterMixin.test_from_pretrained_no_checkpoint: the same parameters, and here the
    original's logits."""
    original = converted[family_id][0]
    model = precompute(clone(original))
    new = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert type(new) is type(model)
    for (name, p1), (_, p2) in zip(model.named_parameters(), new.named_parameters(), strict=True):
        assert torch.equal(p1, p2), name
    assert_same_logits(new, original, left_padded_batch(original.config.vocab_size), torch.float32)


def test_precompute_leaves_the_callers_config_as_it_was():
    """The config a caller built the original from still builds originals and other heads."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaForSequenceClassification

    original = build_tiny(family("llama"))
    config = original.config
    before = config.to_dict()
    model = precompute(original)
    assert model.config is not config and model.config.firstlayer
    assert type(config).__name__ == "LlamaConfig" and not hasattr(config, "firstlayer")
    assert config.to_dict() == before
    assert all(getattr(m, "config", model.config) is model.config for m in model.modules())
    assert type(LlamaForSequenceClassification._from_config(config)).__name__ == (
        "LlamaForSequenceClassification"
    )
    rebuilt = AutoModelForCausalLM.from_config(config)
    assert type(rebuilt) is LlamaForCausalLM
    assert isinstance(rebuilt.get_input_embeddings(), torch.nn.Embedding)


@pytest.mark.parametrize("family_id", FAMILY_IDS)
def test_resize_token_embeddings_is_refused_unless_it_changes_nothing(converted, family_id):
    original = converted[family_id][0]
    model = precompute(clone(original))
    table = model.get_input_embeddings()
    vocab = table.num_embeddings
    assert model.resize_token_embeddings() is table
    assert model.resize_token_embeddings(vocab) is table
    for call in (
        lambda: model.resize_token_embeddings(vocab + 8),
        lambda: model.resize_token_embeddings(vocab - 8),
        lambda: model.resize_token_embeddings(vocab, pad_to_multiple_of=vocab + 1),
    ):
        with pytest.raises(FirstLayerError, match="resize the original model's embeddings"):
            call()
    assert model.get_input_embeddings() is table and table.num_embeddings == vocab
    assert_same_logits(
        model, original, left_padded_batch(original.config.vocab_size), torch.float32
    )
