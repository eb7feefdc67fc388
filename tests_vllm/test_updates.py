"""Weights that change under a running engine: an update of what the table does not depend on is
applied as in the original; one that would leave the table stale is refused, with the reason,
before vLLM takes anything off, and the engine serves on."""

from __future__ import annotations

import pytest
import torch
from conftest import close, engine, families, original_and_converted, prompts, widened
from safetensors.torch import load_file

from firstlayer.errors import FirstLayerError


def greedy_tokens(llm, count: int = 3) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts(count)],
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def reload(llm, weights=None) -> None:
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})


@pytest.fixture(scope="module")
def llama_folders(workdir):
    llama = widened(next(f for f in families.FAMILIES if f.id == "llama"))
    return original_and_converted(llama, workdir / "updates")


def test_updates_apply_where_the_table_stays_valid_and_are_refused_where_not(llama_folders):
    original_folder, precomputed_folder = llama_folders
    weights = load_file(original_folder / "model.safetensors")
    later = "model.layers.1.mlp.down_proj.weight"
    update = [(later, weights[later] * 1.5)]
    first = "model.layers.0.self_attn.q_proj.weight"

    llm = engine(original_folder)
    try:
        before = greedy_tokens(llm)
        reload(llm, update)
        expected = greedy_tokens(llm)
    finally:
        close(llm)
    assert expected != before  # the update acts

    llm = engine(precomputed_folder)
    try:
        assert greedy_tokens(llm) == before
        with pytest.raises(FirstLayerError, match=f"refuses new weights for {first}.*stale"):
            reload(llm, [(first, weights[first] * 1.5)])
        with pytest.raises(FirstLayerError, match="refuses new weights for model.embed_tokens"):
            reload(llm, [("model.embed_tokens.weight", torch.zeros(1))])
        with pytest.raises(FirstLayerError, match="from disk in place is refused"):
            reload(llm)
        with pytest.raises(FirstLayerError, match="weight-transfer updates .* are refused"):
            llm.collective_rpc("start_weight_update")
        assert greedy_tokens(llm) == before  # refused before anything was taken off
        reload(llm, update)
        assert greedy_tokens(llm) == expected
    finally:
        close(llm)
