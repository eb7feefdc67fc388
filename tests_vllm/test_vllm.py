"""Precomputed folders in vLLM: the same greedy tokens as vLLM running the original folder, for
every family the plugin serves, compiled, with two ranks, and nothing missing ever runs."""

from __future__ import annotations

import json
import os
import shutil
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import (
    WIDE,
    Family,
    Run,
    build_tiny,
    close,
    dequantized_copy,
    engine,
    families,
    greedy,
    max_logprob_difference,
    original_and_converted,
    prompts,
    rewrite_folder,
    widened,
)
from safetensors.torch import load_file, save_file

from firstlayer.errors import FirstLayerError
from firstlayer.families import SUPPORTED_TYPES, VllmNotServed, family_of
from firstlayer.vllm.classes import served_families

# float32 logprobs of the chosen tokens: eager runs agree to the bit in practice; compiled graphs
# fuse differently around layer 0.
LOGPROB_TOLERANCE = 1e-4

# Every test configuration of every family the plugin serves (tests/conftest.py), widened.
CASES = tuple(widened(f) for f in families.FAMILIES if f.model_type in served_families())
CASE = {case.id: case for case in CASES}


def routes(kind: type) -> set[str]:
    return {t for t in SUPPORTED_TYPES if isinstance(family_of(t).vllm_route(t), kind)}


def test_every_family_is_served_and_tested_or_refused_with_a_reason():
    tested = {case.model_type for case in CASES}
    not_served = routes(VllmNotServed)
    assert tested == set(served_families()) == set(SUPPORTED_TYPES) - not_served
    assert all(family_of(t).vllm_route(t).reason for t in not_served)
    assert not tested & not_served


def test_plugin_is_an_entry_point_and_registers_every_family():
    from vllm import ModelRegistry

    from firstlayer.vllm.classes import architecture

    plugin = next(e for e in entry_points(group="vllm.general_plugins") if e.name == "firstlayer")
    plugin.load()()
    for model_type in SUPPORTED_TYPES:
        assert architecture(model_type) in ModelRegistry.get_supported_archs()


def test_a_fresh_interpreter_finds_the_precomputed_class_by_entry_point(
    inspect_model_classes_in_this_process,
):
    """What `vllm serve` does for an architecture it has not seen: load the general plugins in a
    fresh interpreter and inspect the class there (the suite does it in process, see conftest)."""
    from vllm.model_executor.models import registry

    from firstlayer.vllm.classes import architecture

    name = architecture("llama")
    model = registry.ModelRegistry.models[name]
    in_subprocess = inspect_model_classes_in_this_process  # vLLM's own route
    info = in_subprocess(lambda: registry._ModelInfo.from_model_cls(model.load_model_cls()))
    assert info.architecture == name and info.is_text_generation_model


# Serial with q, k and v scaled apart (Llama); parallel with an int8 residual block and one fused
# q/k/v projection that vLLM reorders per kv group (Falcon); through the Transformers backend with
# q/k/v interleaved per head (GPT-NeoX) and fused by the backend (Phi).
INT8_CASES = ["llama", "falcon", "gpt_neox", "phi", "qwen3"]  # qwen3: a scale per head of q/k


@pytest.fixture(scope="module")
def built(workdir) -> dict[str, dict[str, Path]]:
    """Every case's folders, written before any engine starts: vLLM's Transformers backend
    decorates the transformers classes it builds (GPTNeoXModel then needs a vLLM config to be
    built), so this process cannot build a family's model after the backend served it."""
    from firstlayer.conversion import convert

    out = {}
    for case in CASES:
        model = build_tiny(case)
        original = workdir / f"{case.id}-original"
        model.save_pretrained(original)
        paths = {"original": original, "float32": convert(model, workdir / f"{case.id}-float32")}
        if case.id in INT8_CASES:
            int8 = convert(model, workdir / f"{case.id}-int8", table_dtype="int8")
            paths["int8"] = int8
            # The same table dequantized into float32: the values the int8 lookup yields.
            paths["int8 as float32"] = dequantized_copy(int8, workdir / f"{case.id}-int8-as-f32")
        out[case.id] = paths
    return out


@pytest.fixture(scope="module")
def folders(built) -> dict[str, tuple[Path, Path]]:
    return {case_id: (paths["original"], paths["float32"]) for case_id, paths in built.items()}


@pytest.fixture(scope="module")
def int8_folders(built) -> dict[str, tuple[Path, Path]]:
    return {case: (built[case]["int8"], built[case]["int8 as float32"]) for case in INT8_CASES}


@pytest.mark.parametrize("case_id", list(CASE))
def test_greedy_tokens_equal_vllm_on_the_original(folders, case_id):
    original, precomputed = folders[case_id]
    batch = prompts()
    expected = greedy(original, batch)
    got = greedy(precomputed, batch)
    assert all(len(t) == 32 for t in got.tokens)
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


def test_a_folder_with_q_k_norms_in_its_table_serves_the_originals_tokens(folders, workdir):
    """A Qwen3 folder written before format 6, its q and k stored after layer 0's per-head norms
    (which vLLM's attention then must not run again), is served as it was."""
    original, precomputed = folders["qwen3"]
    model = build_tiny(CASE["qwen3"])
    old = families.with_head_norms_folded(precomputed, workdir / "qwen3-format-5", model)
    expected = greedy(original, prompts())
    got = greedy(old, prompts())
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


def test_a_folder_with_layer0_kept_serves_the_originals_tokens(folders, workdir):
    """A folder converted with layer 0's q/k/v kept for embedding inputs (`--keep-layer0`): the
    plugin serves every token from the table and leaves the kept weights unread."""
    from firstlayer.conversion import convert_source

    original, _ = folders["llama"]
    kept, _ = convert_source(str(original), workdir / "llama-kept", keep_layer0=True)
    expected = greedy(original, prompts())
    got = greedy(kept, prompts())
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


@pytest.fixture(scope="module")
def smollm2_folders(smollm2, workdir) -> tuple[Path, Path]:
    from firstlayer.conversion import convert
    from firstlayer.hf.loading import save_source

    model, tokenizer = smollm2
    original = save_source(model, workdir / "smollm2-original", tokenizer)
    return original, convert(model, workdir / "smollm2-precomputed", tokenizer=tokenizer)


def test_smollm2_greedy_tokens_equal_vllm_on_the_original(smollm2, smollm2_folders):
    _, tokenizer = smollm2
    questions = ("What is the capital of France?", "Name three colours.", "Count to five, please.")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in questions
    ]
    batch = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert len({len(ids) for ids in batch}) == 3  # different lengths in one batch
    original, precomputed = smollm2_folders
    expected = greedy(original, batch)
    got = greedy(precomputed, batch)
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE
    assert "Paris" in tokenizer.decode(got.tokens[0])


# Serial, parallel, and parallel through vLLM's Transformers backend.
@pytest.mark.parametrize("case_id", ["llama", "gptj", "gpt_neox"])
def test_compiled_equals_original_compiled(folders, case_id):
    original, precomputed = folders[case_id]
    compiled = Run(enforce_eager=False)
    expected = greedy(original, prompts(), compiled)
    got = greedy(precomputed, prompts(), compiled)
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


TP_CASES = {
    "gqa": Family("gqa", "llama", dict(WIDE, num_key_value_heads=2)),  # serial, a kv head per rank
    # Parallel, multi-query: its one kv head is replicated on both ranks, and attention and MLP
    # share one all-reduce.
    "falcon_tp": Family("falcon_tp", "falcon", WIDE),
}


# Ids outside the vocabulary, which vLLM checks only where it has a tokenizer: at two ranks the
# original's sharded embedding reads a zero embedding for them (at one rank it raises inside the
# step, and its engine is dead). Sent to the GQA Llama with the other prompts, so that its
# two-rank engines serve both tests.
OUTSIDE_THE_VOCABULARY = [[5, -1, 7], [5, 256, 7], [5, 10**6, 7]]


@pytest.fixture(scope="module")
def tp_folders(workdir) -> dict[str, tuple[Path, Path]]:
    return {case_id: original_and_converted(f, workdir) for case_id, f in TP_CASES.items()}


def two_rank_prompts(case_id: str) -> list[list[int]]:
    return (OUTSIDE_THE_VOCABULARY if case_id == "gqa" else []) + prompts()


@pytest.mark.parametrize("case_id", list(TP_CASES))
def test_two_ranks_equal_the_original_on_two_ranks(tp_folders, case_id):
    original, precomputed = tp_folders[case_id]
    two_ranks = Run(tensor_parallel_size=2)
    expected = greedy(original, two_rank_prompts(case_id), two_ranks)
    got = greedy(precomputed, two_rank_prompts(case_id), two_ranks)
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


def test_ids_outside_the_vocabulary_read_a_zero_row_and_the_engine_serves_on(tp_folders):
    """The precomputed model reads a zero row for an id outside the vocabulary on any number of
    ranks, which for a bias-free serial family is what layer 0 makes of a zero embedding: on one
    rank too it gives the original's two-rank tokens, and its engine serves on."""
    original, precomputed = tp_folders["gqa"]
    expected = greedy(original, two_rank_prompts("gqa"), Run(tensor_parallel_size=2))
    done = threading.Event()

    def watchdog():  # an in-process engine whose step raised loops forever on the next request
        if not done.wait(300):
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        assert greedy(precomputed, two_rank_prompts("gqa")).tokens == expected.tokens
    finally:
        done.set()


@pytest.mark.parametrize("case_id", INT8_CASES)
def test_int8_table_reads_as_its_dequantized_float32_table(int8_folders, case_id):
    """Each rank dequantizes its own columns with their row's scale of their segment."""
    int8, as_float32 = int8_folders[case_id]
    assert json.loads((int8 / "config.json").read_text())["firstlayer"]["table"]["dtype"] == "int8"
    expected = greedy(as_float32, prompts())
    got = greedy(int8, prompts())
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


def test_int8_table_on_two_ranks(workdir):
    """Two ranks of a GQA model: each holds its own int8 columns and their segment numbers, and
    reads what one rank holding them all reads (one rank's int8 lookup is held to its
    dequantized float32 table above)."""
    from firstlayer.conversion import convert

    model = build_tiny(TP_CASES["gqa"])
    int8 = convert(model, workdir / "gqa-int8", table_dtype="int8")
    expected = greedy(int8, prompts())
    got = greedy(int8, prompts(), Run(tensor_parallel_size=2))
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE


# A serial family of vLLM's own with a float32 table, and a parallel one through the
# Transformers backend with an int8 table.
@pytest.mark.parametrize("case_id, table_dtype", [("llama", "float32"), ("gpt_neox", "int8")])
def test_table_in_host_memory_gives_the_same_tokens(folders, int8_folders, case_id, table_dtype):
    """`hf_overrides={"table_memory": "host"}`: on this CPU-only machine host memory is the
    device's, so this checks the route (tables built in host memory, rows gathered there), not
    what it saves on an accelerator (benchmarks/vllm_gpu.py measures that)."""
    precomputed = folders[case_id][1] if table_dtype == "float32" else int8_folders[case_id][0]
    expected = greedy(precomputed, prompts())
    got = greedy(precomputed, prompts(), hf_overrides={"table_memory": "host"})
    assert got.tokens == expected.tokens
    assert max_logprob_difference(got, expected) <= LOGPROB_TOLERANCE  # 0.0 measured


def test_an_unknown_table_memory_is_refused(folders):
    with pytest.raises(Exception, match="table_memory='disk' is not one of device, host"):
        engine(folders["llama"][1], hf_overrides={"table_memory": "disk"})


def rewrite_without(folder: Path, tensor_name: str) -> None:
    """Drop one tensor from a converted folder and re-record the file, as a careless edit would."""
    rewrite_folder(folder, lambda tensors, config: tensors.pop(tensor_name))


@pytest.mark.parametrize(
    "case_id, tensor_name",
    [("qwen2", "lm_head.weight"), ("llama", "model.layers.1.mlp.up_proj.weight")],
)
def test_a_missing_weight_is_refused_not_run(folders, workdir, case_id, tensor_name):
    folder = workdir / f"{case_id}-without-{tensor_name}"
    shutil.copytree(folders[case_id][1], folder)
    rewrite_without(folder, tensor_name)
    with pytest.raises(Exception, match=f"lacks weights.*{tensor_name}"):
        engine(folder)


def test_a_truncated_file_is_refused(folders, workdir):
    folder = workdir / "truncated"
    shutil.copytree(folders["llama"][1], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated"):
        engine(folder)


def test_a_format_1_folder_is_refused_not_run(folders, workdir):
    """Format 1 named the original family's architecture, so vLLM builds its own class and the
    plugin never sees the folder: vLLM's loader refuses the table's tensors (firstlayer check
    names the fix). Not intercepted: that would mean replacing vLLM's classes for every model."""
    folder = workdir / "format-1"
    shutil.copytree(folders["llama"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config["firstlayer"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "model.safetensors"  # format 1 kept no attention norm beside the table
    tensors = {k: v for k, v in load_file(weights).items() if ".attn_norm." not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no module or parameter named 'embed_tokens.qkv'"):
        engine(folder)


def test_a_family_the_plugin_does_not_serve_is_refused_with_the_list():
    from firstlayer.vllm.classes import not_served_class

    with pytest.raises(FirstLayerError, match="does not serve mpt .vLLM dropped MPT.*gpt_neox"):
        not_served_class("mpt")(vllm_config=None)


def test_a_multimodal_folder_not_served_yet_is_refused_by_name():
    """Multimodal folders the plugin does not serve yet (Qwen3-VL, Idefics3; the others in
    tests_vllm/test_multimodal.py) get a class that says so, rather than vLLM's family class."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from firstlayer.vllm.classes import architecture, vllm_model_class

    load_general_plugins()
    name = architecture("qwen3_vl")
    assert name == "FirstLayerQwen3VLForConditionalGeneration"
    assert name in ModelRegistry.get_supported_archs()
    with pytest.raises(FirstLayerError, match="does not serve qwen3_vl .*ImageTextToText"):
        vllm_model_class("qwen3_vl")(vllm_config=None)


def test_bench_in_vllm_times_both_folders_in_pairs(folders):
    from firstlayer.analysis.savings import analyze
    from firstlayer.hf import adopt  # noqa: F401  (registers the precomputed classes)
    from firstlayer.render.text import format_engine_bench
    from firstlayer.vllm.bench import bench_vllm

    model = build_tiny(CASE["gptj"])
    result = bench_vllm(model, "gptj", batches=(1, 3), new_tokens=4, prompt_tokens=5, repeats=2)
    analysis = analyze(model.config.to_dict(), accounting="exact")
    assert [r.batch for r in result.results] == [1, 3]
    for r in result.results:
        assert r.decode_ms.ratio.pairs == 2
        assert r.decode_ms.original.median > 0 and r.decode_ms.precomputed.median > 0
        assert r.decode_ceiling == analysis.decode_ceiling(r.batch)
        assert set(r.transformers_tokens_per_s) == {"original", "precomputed"}
    assert "vLLM" in format_engine_bench(result)
    assert result.to_dict()["results"][0]["decode_speedup"] == result.results[0].decode_speedup


def test_a_bench_of_an_engine_that_keeps_no_stats_says_so(folders):
    """vLLM returns no per-request timestamps when it keeps no stats (an offline LLM's default):
    the bench names that, rather than failing on the missing stats."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from firstlayer.vllm.bench import decode_ms_per_step

    llm = engine(folders["llama"][1], disable_log_stats=True)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=[5, 6, 7])],
            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        close(llm)
    assert outputs[0].metrics is None
    with pytest.raises(FirstLayerError, match="no token timestamps"):
        decode_ms_per_step(outputs)
