"""vLLM's other serving modes on a precomputed folder, each against the original: pipeline
stages, prompt embeddings, what a client may send, speculative decoding, prefix caching and
chunked prefill. Each either gives the original's answer or is refused by name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    Family,
    build_tiny,
    close,
    engine,
    families,
    greedy,
    original_and_converted,
    prompts,
    widened,
)

from firstlayer.errors import FirstLayerError
from firstlayer.vllm.bench import speculative_counters

CASES = {
    case.id: case
    for case in (
        widened(f)
        for f in families.FAMILIES
        if f.id in ("llama", "gemma", "gptj", "falcon", "gpt_neox", "arcee")
    )
}


@pytest.fixture(scope="module")
def folders(workdir) -> dict[str, tuple[Path, Path]]:
    root = workdir / "modes"
    root.mkdir()
    return {case_id: original_and_converted(case, root) for case_id, case in CASES.items()}


# --- pipeline parallel --------------------------------------------------------------------------


def build_stage(folder: Path, rank: int, stages: int) -> torch.nn.Module:
    """The model one pipeline stage builds and loads, with vLLM's own loader, in this process:
    vLLM's pipeline group is swapped for one that says "rank `rank` of `stages`" (every module
    reads it through get_pp_group()), as vLLM-ecosystem tests swap `parallel_state._PP`."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    _set_torch_accelerator_to_noop()  # as the CPU runner does: the loader empties the cache
    args = EngineArgs(
        model=str(folder), dtype="float32", max_model_len=256, skip_tokenizer_init=True, seed=0
    )
    vllm_config = args.create_engine_config()
    with set_current_vllm_config(vllm_config):
        started = not parallel_state.model_parallel_is_initialized()
        if started:
            parallel_state.init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                backend="gloo",
                distributed_init_method=f"file://{tempfile.mktemp()}",
            )
            parallel_state.initialize_model_parallel(1, 1)
        real = parallel_state._PP
        parallel_state._PP = SimpleNamespace(
            rank_in_group=rank,
            world_size=stages,
            ranks=list(range(stages)),
            is_first_rank=rank == 0,
            is_last_rank=rank == stages - 1,
            device_group=real.device_group,
            cpu_group=real.cpu_group,
        )
        try:
            return get_model(vllm_config=vllm_config)
        finally:
            parallel_state._PP = real
            if started:
                parallel_state.destroy_model_parallel()
                parallel_state.destroy_distributed_environment()


def is_placeholder(model: torch.nn.Module, name: str) -> bool:
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(model.get_submodule(name), PPMissingLayer)


@pytest.mark.parametrize("case_id", list(CASES))
def test_each_pipeline_stage_builds_as_the_original_stage(folders, case_id):
    """Stage 0 of 2 holds layer 0 and the table; stage 1 is built as vLLM builds the original's,
    with every parameter it reads equal to it, a tied LM head included (loaded from the residual
    block). Some families build an untied embedding on every stage and read it only on the
    first: a parallel folder has no plain embedding to give it there."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    original, precomputed = folders[case_id]
    for rank in (0, 1):
        stage = build_stage(precomputed, rank, 2)
        reference = build_stage(original, rank, 2)
        assert stage.holds_table == (rank == 0)
        mine, theirs = dict(stage.named_parameters()), dict(reference.named_parameters())
        shared = mine.keys() & theirs.keys()
        if rank == 1 and not stage.config.tie_word_embeddings:
            embeddings = [n for n, m in stage.named_modules() if type(m) is VocabParallelEmbedding]
            shared -= {f"{name}.weight" for name in embeddings}
        differ = [name for name in shared if not torch.equal(mine[name], theirs[name])]
        assert not differ, (rank, differ)
        if rank == 1:  # nothing of the table on a stage without layer 0; a tied parallel
            # family's head is a tensor of its own (its table's first block is x + mlp(x))
            assert mine.keys() - theirs.keys() <= {"lm_head.weight"}
            assert theirs.keys() <= mine.keys()
            if isinstance(getattr(reference, "lm_head", None), torch.nn.Module):
                assert torch.equal(stage.lm_head.weight, reference.lm_head.weight)
        else:
            assert any("qkv" in name for name in mine.keys() - theirs.keys())


def test_a_middle_stage_holds_no_table(folders):
    """Three stages of a 2-layer model: [1, 1, 0] layers; the middle one holds layer 1 only."""
    original, precomputed = folders["llama"]
    stage, reference = build_stage(precomputed, 1, 3), build_stage(original, 1, 3)
    assert not stage.holds_table and is_placeholder(stage, "model.layers.0")
    for name, parameter in reference.named_parameters():
        assert torch.equal(stage.get_parameter(name), parameter), name


@pytest.fixture
def partition(monkeypatch):
    """VLLM_PP_LAYER_PARTITION as vLLM reads it now: an in-process engine caches its variables."""
    import vllm.envs

    vllm.envs.disable_envs_cache()

    def set_partition(value: str) -> None:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", value)

    return set_partition


def test_a_partition_without_layers_on_the_first_stage_is_refused_at_config(folders, partition):
    from vllm.engine.arg_utils import EngineArgs

    _, precomputed = folders["llama"]
    partition("0,2")
    args = EngineArgs(
        model=str(precomputed),
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        skip_tokenizer_init=True,
    )
    with pytest.raises(Exception, match="first pipeline stage's embedding"):
        args.create_engine_config()
    with pytest.raises(FirstLayerError, match="first pipeline stage's embedding"):
        build_stage(precomputed, 1, 2)  # layer 0 on stage 1 of 2: the model refuses as well


WORKER_EXTENSION = "pipeline_workers.AllocateIntermediateTensors"


def test_two_pipeline_stages_give_the_original_tokens(folders, monkeypatch):
    """PP=2 with two worker processes: the tokens of the original on one stage. vLLM 0.32's CPU
    runner needs a buffer allocated for eager pipeline parallel (`pipeline_workers`), for the
    original as much as for the precomputed model."""
    original, precomputed = folders["llama"]
    here = str(Path(__file__).parent)  # the workers import the extension from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    llm = engine(
        precomputed,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        worker_extension_cls=WORKER_EXTENSION,
    )
    try:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        assert llm.collective_rpc("allocate_intermediate_tensors") == [False, True]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts()],
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        close(llm)
    assert [list(o.outputs[0].token_ids) for o in outputs] == greedy(original, prompts()).tokens


# --- prompt embeddings ----------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["llama", "gpt_neox"])
def test_prompt_embeddings_are_refused_before_the_engine_starts(folders, case_id):
    from vllm.engine.arg_utils import EngineArgs

    _, precomputed = folders[case_id]
    args = EngineArgs(model=str(precomputed), enable_prompt_embeds=True, skip_tokenizer_init=True)
    with pytest.raises(Exception, match="cannot take prompt embeddings") as refused:
        args.create_engine_config()
    assert "serve the original model for embedding prompts" in str(refused.value)


def test_speculation_through_the_targets_embedding_is_refused(folders):
    from vllm.engine.arg_utils import EngineArgs

    original, precomputed = folders["llama"]
    args = EngineArgs(
        model=str(precomputed),
        skip_tokenizer_init=True,
        speculative_config={"method": "eagle", "model": str(original), "num_speculative_tokens": 2},
    )
    with pytest.raises(Exception, match="method 'eagle' is not served on a precomputed target"):
        args.create_engine_config()


# --- what a client sends ----------------------------------------------------------------------

PROMPT = [5, 17, 99, 3, 200, 41, 8, 120]


def word_tokenizer():
    """A 256-token word-level tokenizer (t0 ... t255), for what vLLM does only with a tokenizer:
    checking token ids, beam search."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    )


@pytest.fixture(scope="module")
def tokenized(workdir) -> tuple[Path, Path]:
    from firstlayer.conversion import convert

    model, tokenizer = build_tiny(widened(Family("llama", "llama", {}))), word_tokenizer()
    original = workdir / "llama-tokenizer-original"
    model.save_pretrained(original)
    tokenizer.save_pretrained(original)
    return original, convert(model, workdir / "llama-tokenizer-precomputed", tokenizer=tokenizer)


def client_cases(vocab_size: int) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    def params(**changes):
        return SamplingParams(**{"temperature": 0, "max_tokens": 6, "ignore_eos": True, **changes})

    def generate(llm, prompt, sampling):
        from vllm.inputs import TokensPrompt

        output = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sampling, use_tqdm=False)[0]
        answer = {"tokens": [list(c.token_ids) for c in output.outputs]}
        if output.prompt_logprobs is not None:
            answer["prompt_logprobs"] = [
                None if step is None else {t: round(v.logprob, 4) for t, v in step.items()}
                for step in output.prompt_logprobs
            ]
        return answer

    def beams(llm):
        from vllm.inputs import TokensPrompt

        found = llm.beam_search(
            [TokensPrompt(prompt_token_ids=PROMPT)], BeamSearchParams(beam_width=3, max_tokens=6)
        )
        return [(s.tokens, round(s.cum_logprob, 4)) for s in found[0].sequences]

    return {
        "plain": lambda llm: generate(llm, PROMPT, params()),
        "empty prompt": lambda llm: generate(llm, [], params()),
        "max_tokens beyond the context": lambda llm: generate(llm, PROMPT, params(max_tokens=1000)),
        "prompt as long as the context": lambda llm: generate(llm, [7] * 256, params()),
        "logit_bias": lambda llm: generate(llm, PROMPT, params(logit_bias={11: 100.0})),
        "logit_bias outside the vocabulary": lambda llm: generate(
            llm, PROMPT, params(logit_bias={vocab_size + 5: 100.0})
        ),
        "prompt_logprobs": lambda llm: generate(llm, PROMPT, params(prompt_logprobs=2)),
        "n=3 seeded sampling": lambda llm: generate(
            llm, PROMPT, params(n=3, temperature=0.8, seed=7)
        ),
        "n=3 greedy": lambda llm: generate(llm, PROMPT, params(n=3)),
        "beam search": beams,
        "token id -1": lambda llm: generate(llm, [5, -1, 7], params()),
        "token id = vocabulary size": lambda llm: generate(llm, [5, vocab_size, 7], params()),
        "token id 10**6": lambda llm: generate(llm, [5, 10**6, 7], params()),
    }


def answers_to_clients(folder: Path) -> dict[str, object]:
    """Each case's answer or refusal, and after each, whether the engine still answers."""
    llm = engine(folder, skip_tokenizer_init=False)
    answers = {}
    try:
        for name, case in client_cases(256).items():
            try:
                answers[name] = case(llm)
            except Exception as refused:  # vLLM's refusal of the request
                answers[name] = f"refused: {type(refused).__name__}: {refused}"
            answers[f"{name}, then"] = client_cases(256)["plain"](llm)
    finally:
        close(llm)
    return answers


def test_what_a_client_sends_gets_the_originals_answer_or_refusal(tokenized):
    """Served with a tokenizer, as behind `vllm serve`: every case answers or is refused exactly
    as by the original, and the engine serves the next request."""
    original, precomputed = tokenized
    expected, answers = answers_to_clients(original), answers_to_clients(precomputed)
    assert answers == expected
    assert "out of vocabulary" in str(expected["token id -1"])
    assert "cannot be empty" in str(expected["empty prompt"])
    assert len(expected["beam search"]) == 3


# --- speculative decoding -------------------------------------------------------------------


def speculate(target: Path, draft: Path) -> tuple[list[list[int]], dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engine(
        target,
        disable_log_stats=False,
        speculative_config=dict(method="draft_model", model=str(draft), num_speculative_tokens=3),
    )
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts()],
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outputs], speculative_counters(llm)
    finally:
        close(llm)


@pytest.mark.parametrize("precomputed_side", ["draft", "target"])
def test_speculative_decoding_with_a_precomputed_draft_or_target_is_exact(
    folders, precomputed_side
):
    """The draft is the target's own model, one side converted: any difference between the two
    would reject a drafted token. Every drafted token is accepted, the target's tokens stand."""
    original, precomputed = folders["llama"]
    target, draft = original, precomputed
    if precomputed_side == "target":
        target, draft = precomputed, original
    tokens, counters = speculate(target, draft)
    assert tokens == greedy(original, prompts()).tokens
    assert counters["num_draft_tokens"] > 0
    assert counters["num_accepted_tokens"] == counters["num_draft_tokens"]
    assert counters["num_accepted_tokens_per_pos"] == [counters["num_drafts"]] * 3


# --- prefix caching and chunked prefill -----------------------------------------------------


def cached_and_chunked(folder: Path) -> list[tuple[list[int], int, list[float]]]:
    """A 100-token prompt twice, then extended by 30, then an unrelated one, through 32-token
    cache blocks and a 32-token step budget (every prompt prefilled in chunks)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    generator = torch.Generator().manual_seed(3)
    base = torch.randint(3, 256, (100,), generator=generator).tolist()
    extended = base + torch.randint(3, 256, (30,), generator=generator).tolist()
    other = torch.randint(3, 256, (70,), generator=generator).tolist()
    llm = engine(
        folder,
        enable_prefix_caching=True,
        block_size=32,
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,
    )
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    results = []
    try:
        for prompt in (base, base, extended, other):
            output = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            completion = output[0].outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [s[t].logprob for s, t in zip(completion.logprobs, tokens, strict=True)]
            results.append((tokens, output[0].num_cached_tokens, logprobs))
    finally:
        close(llm)
    return results


@pytest.mark.parametrize("case_id", ["llama", "gpt_neox"])
def test_prefix_caching_and_chunked_prefill_are_exact(folders, case_id):
    original, precomputed = folders[case_id]
    expected, results = cached_and_chunked(original), cached_and_chunked(precomputed)
    assert [cached for _, cached, _ in results] == [0, 96, 96, 0]  # three 32-token blocks hit
    for (tokens, cached, logprobs), (want, want_cached, want_logprobs) in zip(
        results, expected, strict=True
    ):
        assert (tokens, cached) == (want, want_cached)
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= 1e-4
