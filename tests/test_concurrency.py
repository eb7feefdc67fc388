"""One precomputed model serving many calls at once gives what each call gives alone.

Rows travel with their call (a keyword argument, or a context variable for Falcon), so threads
and asyncio tasks run in threads cannot exchange them, as a server's thread pool would.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import FAMILIES, build_tiny, clone

from firstlayer import precompute
from firstlayer.errors import FirstLayerError
from firstlayer.tools.verify import FLOAT32_LOGIT_TOLERANCE

THREADS = 8
CALLS_PER_THREAD = 6
# serial, Gemma's scaled embedding, parallel (kwargs route), Falcon (context-variable route)
CONCURRENT_FAMILIES = ("llama", "gemma", "gpt_neox", "falcon")


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


def prompts(same_length: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    lengths = [7] * THREADS if same_length else [1 + 3 * i for i in range(THREADS)]
    return [torch.randint(3, 250, (2, n), generator=generator) for n in lengths]


@pytest.fixture(params=CONCURRENT_FAMILIES)
def model(request):
    return precompute(build_tiny(family(request.param)))


@pytest.mark.parametrize("same_length", [True, False], ids=["equal_lengths", "mixed_lengths"])
def test_threads_get_what_sequential_calls_get(model, same_length):
    inputs = prompts(same_length)
    with torch.inference_mode():
        expected = [model(input_ids=ids).logits for ids in inputs]

    def calls(index: int) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(input_ids=inputs[index]).logits for _ in range(CALLS_PER_THREAD)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(calls, range(THREADS)))
    for index, logits in enumerate(results):
        for one in logits:
            assert torch.equal(one, expected[index]), index


def test_concurrent_generate_matches_sequential(model):
    inputs = prompts(same_length=False)[:4]
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = [model.generate(input_ids=ids, **settings) for ids in inputs]
    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(lambda ids: model.generate(input_ids=ids, **settings), inputs))
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))


def test_asyncio_tasks_run_in_threads(model):
    inputs = prompts(same_length=True)
    with torch.inference_mode():
        expected = [model(input_ids=ids).logits for ids in inputs]

    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids).logits

    async def serve() -> list[torch.Tensor]:
        return await asyncio.gather(*(asyncio.to_thread(call, ids) for ids in inputs))

    results = asyncio.run(serve())
    assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))


def test_the_inputs_embeds_error_comes_only_with_inputs_embeds(model):
    ids = prompts(same_length=True)[0]
    with torch.inference_mode():
        model(input_ids=ids)  # no error without inputs_embeds, before or after one
        with pytest.raises(FirstLayerError, match="not inputs_embeds"):
            model(inputs_embeds=torch.zeros(1, 3, model.config.hidden_size))
        model(input_ids=ids)


@pytest.mark.slow
def test_compiled_model_matches_and_traces_without_a_graph_break():
    """The rows travel as a keyword argument, which dynamo traces: fullgraph compiles."""
    original = build_tiny(family("llama"))
    model = precompute(clone(original))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    ids = prompts(same_length=True)[0]
    with torch.inference_mode():
        expected = original(input_ids=ids).logits
        actual = compiled(input_ids=ids).logits
    assert (expected - actual).abs().max() <= FLOAT32_LOGIT_TOLERANCE
