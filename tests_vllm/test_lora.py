"""LoRA adapters on precomputed folders in vLLM: every request of a mixed batch gives the original
folder's tokens with the same adapters; what the table replaced and cannot take an adapter exactly
is refused by name when the adapter is loaded, and the engine serves on."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Run, build_tiny, close, engine, families, prompts, widened

from firstlayer.conversion import convert

LOGPROB_TOLERANCE = 1e-4
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Per case: the adapters (name -> LoraConfig settings) served together, and one that is refused.
CASES = {
    # A on q/k/v/o and the MLP of every layer, layer 0 included; B rank 16 on q and v.
    "llama": {
        "A": dict(r=8, target_modules=LLAMA_TARGETS),
        "B": dict(r=16, target_modules=["q_proj", "v_proj"]),
    },
    # Per-head q/k norms, which the model runs on the table's q and k (format 6): layer 0's q and
    # k take an adapter before the norm, as in the original.
    "qwen3": {
        "A": dict(r=8, target_modules=LLAMA_TARGETS),
        "B": dict(r=16, target_modules=["q_proj", "k_proj"]),
    },
    # Serial on vLLM's Transformers backend, no attention norm, q/k norms across all heads.
    "olmo2": {
        "A": dict(r=8, target_modules=LLAMA_TARGETS),
        "B": dict(r=16, target_modules=["q_proj", "k_proj"]),
    },
    # Serial on the backend, which keeps its one fused query_key_value as it is.
    "gpt_neox_serial": {
        "A": dict(r=8, target_modules=["query_key_value", "dense", "dense_h_to_4h"]),
        "B": dict(r=16, target_modules=["query_key_value"]),
    },
    # Parallel, on vLLM's Transformers backend: layer 0's attention output takes an adapter;
    # its q/k/v and MLP, in the table, do not.
    "gpt_neox": {
        "A": dict(r=8, target_modules=["dense"]),
        "B": dict(
            r=16, target_modules=["query_key_value", "dense_h_to_4h"], layers_to_transform=[1]
        ),
        "refused": dict(r=8, target_modules=["dense_h_to_4h"]),
    },
}


def save_adapter(model, path, seed, **settings):
    """As PEFT saves one, with random B (PEFT starts B at zero, an adapter without effect)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **settings)
    get_peft_model(copy.deepcopy(model), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_folders(workdir):
    """Per case: the original and converted folders, and the adapters' folders."""
    out = {}
    for case_id, adapters in CASES.items():
        case = widened(next(f for f in families.FAMILIES if f.id == case_id))
        model = build_tiny(case)
        original = workdir / f"lora-{case_id}-original"
        model.save_pretrained(original)
        paths = {"original": original, "precomputed": convert(model, workdir / f"lora-{case_id}")}
        for seed, (name, settings) in enumerate(adapters.items()):
            paths[name] = save_adapter(model, workdir / f"lora-{case_id}-{name}", seed, **settings)
        out[case_id] = paths
    return out


def lora_requests(paths, names):
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(sorted({n for n in names if n}))}
    return [None if n is None else LoRARequest(n, ids[n], str(paths[n])) for n in names]


def serve(folder, paths, names, run=None, **overrides):
    """Greedy tokens and logprobs of one batch, each prompt with its adapter (or none)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    settings = {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2, **overrides}
    llm = engine(folder, run or Run(), **settings)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts(len(names))],
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0),
            lora_request=lora_requests(paths, names),
            use_tqdm=False,
        )
    finally:
        close(llm)
    return [
        (
            list(o.outputs[0].token_ids),
            [
                s[t].logprob
                for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
            ],
        )
        for o in outputs
    ]


def assert_same(original, precomputed):
    for (tokens_a, logprobs_a), (tokens_b, logprobs_b) in zip(original, precomputed, strict=True):
        assert tokens_a == tokens_b
        assert (
            max(abs(a - b) for a, b in zip(logprobs_a, logprobs_b, strict=True))
            <= LOGPROB_TOLERANCE
        )


@pytest.mark.parametrize("case_id", list(CASES))
def test_every_request_of_a_mixed_batch_gets_the_originals_tokens(lora_folders, case_id):
    """Adapters [A, B, none, A] in one batch (on CPU vLLM gives the adapter-free request the
    last slot's adapter in both engines: an upstream bug, which the precomputed engine shares
    exactly since it uses the same LoRA kernels)."""
    paths = lora_folders[case_id]
    names = ["A", "B", None, "A"]
    original = serve(paths["original"], paths, names)
    precomputed = serve(paths["precomputed"], paths, names)
    assert_same(original, precomputed)
    alone = serve(paths["precomputed"], paths, [None] * 4, enable_lora=False, max_loras=1)
    assert original[0][0] != alone[0][0]  # the adapter acts


def test_two_ranks_give_the_originals_tokens_with_an_adapter(workdir, lora_folders):
    """GQA on two ranks: one kv head each, the adapter's B sliced per rank as vLLM slices it."""
    paths = lora_folders["llama"]
    names = ["A", None, "A"]
    run = Run(tensor_parallel_size=2)
    assert_same(
        serve(paths["original"], paths, names, run), serve(paths["precomputed"], paths, names, run)
    )


@pytest.mark.parametrize("case_id", ["gpt_neox"])
def test_an_inexact_adapter_is_refused_by_name_and_the_engine_serves_on(lora_folders, case_id):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    paths = lora_folders[case_id]
    refused, good = lora_requests(paths, ["refused", "A"])
    llm = engine(paths["precomputed"], enable_lora=True, max_lora_rank=16, max_loras=2)
    try:
        with pytest.raises(Exception, match="targets modules of layer 0 .*layers.0"):
            llm.llm_engine.add_lora(refused)  # what --lora-modules and the load endpoint call
        prompt = [TokensPrompt(prompt_token_ids=prompts(1)[0])]
        sampling = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        with pytest.raises(Exception, match="--adapter DIR"):  # a request's adapter: front end
            llm.generate(prompt, sampling, lora_request=[refused], use_tqdm=False)
        served = llm.generate(prompt, sampling, lora_request=[good], use_tqdm=False)
        assert len(served[0].outputs[0].token_ids) == 4
    finally:
        close(llm)
