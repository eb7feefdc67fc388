"""The precomputed GGUF in llama.cpp (issue 27): `export_gguf` drops layer 0's token-local tensors
for `token_qkv`, and a llama.cpp built with llama.cpp/0001-token-qkv.patch (`make llama-cpp`)
runs it with the original's logits, over a prompt, KV-cached decoding and batched sequences."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf_models import VOCAB, Shape, write_dequantized, write_requantized, write_tiny

from firstlayer.analysis.gguf_header import read_gguf_header
from firstlayer.analysis.sources import default_gguf_path
from firstlayer.cli import main
from firstlayer.errors import FirstLayerError
from firstlayer.llamacpp.converter import cache_root
from firstlayer.llamacpp.engine import (
    F32_TYPE,
    PATCH_MARKER,
    Engine,
    llama_server_path,
    patched_build_problem,
)
from firstlayer.llamacpp.export import copy_metadata, export_gguf

PROBLEM = patched_build_problem()
needs_patched_build = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))

# Two graphs that differ only in where layer 0's q, k, v (and a parallel block's x + ffn(x)) come
# from: the table holds them as numpy summed them, the original as ggml's matmul does, so they
# differ by float32 rounding. With keys and values cached in F32 (flash attention off) that is all
# there is: measured 1.3e-7 of the largest logit (tiny Llama, its q/k/v in F32, Q8_0 or Q4_1),
# 6.4e-6 (tiny GPT-NeoX: ggml's float16 GELU table turns a last-bit difference into a float16 one
# now and then) and 9.4e-7 (SmolLM2 F32, 30 layers). llama.cpp's default F16 cache rounds k and v to
# float16, which does the same: measured 2.5e-5 (tiny Llama), 1.1e-4 (tiny GPT-NeoX) and 5.5e-4
# (SmolLM2), where llama.cpp's own logits for one prompt differ by 1.5e-4 to 2.6e-4 between a batch
# of one sequence and of three (tiny models) and 5.7e-4 between one batch and one token at a time
# (SmolLM2).
FLOAT32_TOLERANCE = 3e-5  # relative to the largest logit
F16_CACHE_TOLERANCE = 2e-4
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # bos, then bytes
DECODE_STEPS = 12
ARCHS = {"llama": MODEL_ARCH.LLAMA, "gptneox": MODEL_ARCH.GPTNEOX}
Q4_K_M = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """arch -> (a tiny F32 original, its precomputed export with an F32 table), made once."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            original = write_tiny(folder / "original.gguf", ARCHS[arch])
            made[arch] = original, export_gguf(original, folder / "precomputed.gguf", "F32").out
        return made[arch]

    return get


@pytest.fixture(params=list(ARCHS))
def tiny(request, tiny_models) -> tuple[Path, Path]:
    return tiny_models(request.param)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_llama(
    path: Path, prompt: list[int], steps: int, kv_cache_f32: bool = True
) -> tuple[np.ndarray, list[int]]:
    """Through `llama_cpp.Llama`: every prompt position's logits and `steps` greedy tokens, each
    decoded against the KV cache; returns (logits of every position, greedy tokens)."""
    from llama_cpp import Llama

    f32 = {"type_k": F32_TYPE, "type_v": F32_TYPE} if kv_cache_f32 else {}
    llm = Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False, **f32)
    try:
        llm.eval(prompt)
        tokens = []
        for _ in range(steps):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        return np.array(llm.scores[: llm.n_tokens]), tokens
    finally:
        llm.close()


def run_batched(path: Path, prompts: list[list[int]], steps: int) -> tuple[np.ndarray, list]:
    """Several sequences in each batch, as llama-server's parallel slots run: every prompt in one
    batch, then one greedy token per sequence per batch. Returns (every logit row, the tokens)."""
    with Engine(path, n_ctx=256, n_seq_max=len(prompts), kv_cache_f32=True) as engine:
        tokens, positions, seqs = [], [], []
        for seq, prompt in enumerate(prompts):
            tokens += prompt
            positions += range(len(prompt))
            seqs += [seq] * len(prompt)
        rows = [engine.decode(tokens, positions, seqs, [True] * len(tokens))]
        ends = np.cumsum([len(p) for p in prompts]) - 1
        last = rows[0][ends]
        generated: list[list[int]] = [[] for _ in prompts]
        lengths = [len(p) for p in prompts]
        for _ in range(steps):
            step = [int(np.argmax(row)) for row in last]
            for seq, token in enumerate(step):
                generated[seq].append(token)
            last = engine.decode(step, lengths, range(len(prompts)), [True] * len(prompts))
            lengths = [n + 1 for n in lengths]
            rows.append(last)
        return np.concatenate(rows), generated


@contextmanager
def llama_server(path: Path, slots: int) -> Iterator[str]:
    """llama.cpp's llama-server on PATH's model with `slots` parallel slots, keys and values in
    F32 and flash attention off (as `kv_cache_f32`), on a free local port; yields its address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(llama_server_path()), "-m", str(path), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--parallel", str(slots), "--ctx-size", str(256 * slots)]
    command += ["--threads", "1", "-ctk", "f32", "-ctv", "f32", "--flash-attn", "off"]
    log = path.with_suffix(f".server-{port}.log")
    with open(log, "wb") as sink:  # a pipe would fill up and stall the server
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise AssertionError(f"llama-server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{address}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"llama-server never became ready: {log.read_text()[-2000:]}")
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


def complete(address: str, prompt: list[int], steps: int) -> list[tuple[int, float]]:
    """One greedy /completion of `steps` tokens: (token id, its logprob) per step."""
    request = {"prompt": prompt, "n_predict": steps, "temperature": 0, "n_probs": 1}
    request |= {"ignore_eos": True, "return_tokens": True}
    body = json.dumps(request).encode()
    call = urllib.request.Request(
        f"{address}/completion", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(call, timeout=120) as reply:
        answer = json.loads(reply.read())
    return [(step["id"], step["logprob"]) for step in answer["completion_probabilities"]]


@pytest.mark.skipif(
    llama_server_path() is None, reason="no llama-server beside python: `make llama-cpp` builds it"
)
def test_llama_servers_parallel_slots_answer_as_for_the_original(tiny):
    """llama.cpp's own server, 2 parallel slots, 3 requests at once (continuous batching puts
    several sequences in each batch), then the same 3 again (their prompts from the slots' cache):
    the precomputed file's greedy tokens are the original's and each token's logprob within
    float32 rounding."""
    prompts = [PROMPT, PROMPT[:5] + [33, 34, 35], [256, *range(90, 110)]]
    answers = {}
    for name, path in zip(("original", "precomputed"), tiny, strict=True):
        with llama_server(path, slots=2) as address, ThreadPoolExecutor(3) as pool:
            answers[name] = [
                list(pool.map(lambda prompt: complete(address, prompt, DECODE_STEPS), prompts))
                for _ in range(2)
            ]
    for round_original, round_precomputed in zip(*answers.values(), strict=True):
        for original, precomputed in zip(round_original, round_precomputed, strict=True):
            assert [t for t, _ in precomputed] == [t for t, _ in original]
            gap = max(abs(a - b) for (_, a), (_, b) in zip(original, precomputed, strict=True))
            assert gap < 1e-4, gap


def embedding_bytes(path: Path) -> bytes:
    """token_embd's bytes (an F32 one's) as the file stores them."""
    header = read_gguf_header(path)
    count = int(np.prod(header.tensors["token_embd.weight"]))
    with open(path, "rb") as file:
        file.seek(header.data_start + header.tensor_offsets["token_embd.weight"])
        return file.read(4 * count)


def test_the_export_replaces_layer0_with_token_qkv_and_says_so(tiny):
    original, precomputed = tiny
    before, after = read_gguf_header(original), read_gguf_header(precomputed)
    is_parallel = before.metadata["general.architecture"] == "gptneox"
    dropped = after.metadata["firstlayer.dropped"]
    assert all(name.startswith("blk.0.") and name not in after.tensors for name in dropped)
    assert set(before.tensors) - set(after.tensors) == set(dropped)
    assert "blk.0.attn_norm.weight" in dropped and "blk.0.attn_output.weight" in after.tensors
    assert ("blk.0.ffn_up.weight" in dropped) == is_parallel
    vocab = before.tensors["token_embd.weight"][1]
    width = 3 * 64 if is_parallel else (4 + 2 + 2) * 16  # q | k | v: 4 heads, GQA 2 in Llama
    assert after.tensors["token_qkv.weight"] == (width, vocab)
    assert after.tensor_types["token_qkv.weight"] == GGMLQuantizationType.F32
    assert after.metadata["firstlayer.token_embd"] == ("x + ffn(x)" if is_parallel else "x")
    assert after.metadata["firstlayer.table_type"] == "F32"
    same = embedding_bytes(original) == embedding_bytes(precomputed)
    assert same != is_parallel  # a parallel block's token_embd holds x + ffn(x)


@pytest.mark.parametrize("stem", ["a", "a" * 33])  # 32 more bytes of metadata: one of the two
def test_every_tensor_starts_on_a_cache_line(tiny_models, tmp_path, stem):
    """GGUF's default alignment (32) put every tensor of some exports half a cache line off (each
    64-byte load of ggml's CPU kernels then spans two lines); the source's name, written into the
    metadata, decided which exports."""
    original = tmp_path / f"{stem}.gguf"
    original.write_bytes(tiny_models("llama")[0].read_bytes())
    reader = GGUFReader(export_gguf(original, tmp_path / "precomputed.gguf", "F16").out)
    assert reader.alignment == 64
    assert [t.name for t in reader.tensors if t.data_offset % 64] == []


@pytest.mark.parametrize("extra", [0, 32, 64, 96])  # the metadata's end at every 32 mod 128
def test_a_sources_larger_alignment_is_kept(tmp_path, extra):
    """A source written with general.alignment 128: the export declares and keeps 128 (copying
    the key without aligning to it would make llama.cpp read every tensor from the wrong place)."""
    source = tmp_path / f"{'a' * extra}aligned.gguf"
    reader = GGUFReader(write_tiny(tmp_path / "plain.gguf", MODEL_ARCH.LLAMA))
    writer = GGUFWriter(source, "llama")
    writer.add_custom_alignment(128)
    copy_metadata(reader, writer)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    precomputed = export_gguf(source, tmp_path / "precomputed.gguf", "F32").out
    exported = GGUFReader(precomputed)
    assert exported.alignment == 128
    assert [t.name for t in exported.tensors if t.data_offset % 128] == []
    kept = {t.name: t.data for t in exported.tensors}
    for tensor in reader.tensors:
        if tensor.name in kept and tensor.name != "token_embd.weight":
            np.testing.assert_array_equal(kept[tensor.name], tensor.data, err_msg=tensor.name)
    if PROBLEM is None:
        assert_decodes_alike(source, precomputed, FLOAT32_TOLERANCE)


def assert_decodes_alike(original: Path, precomputed: Path, tolerance: float, f32: bool = True):
    """The same greedy tokens over PROMPT and DECODE_STEPS KV-cached steps, and every logit
    within `tolerance` of the largest; keys and values cached in F32 or llama.cpp's F16."""
    expected_logits, expected_tokens = run_llama(original, PROMPT, DECODE_STEPS, f32)
    logits, tokens = run_llama(precomputed, PROMPT, DECODE_STEPS, f32)
    assert relative_error(logits, expected_logits) < tolerance
    assert tokens == expected_tokens


@needs_patched_build
@pytest.mark.parametrize("cache", ["f32", "f16"])
def test_precomputed_logits_and_greedy_tokens_match_the_original(tiny, cache):
    tolerance = FLOAT32_TOLERANCE if cache == "f32" else F16_CACHE_TOLERANCE
    assert_decodes_alike(*tiny, tolerance, cache == "f32")


def quantized_by_llama_cpp(source: Path, out: Path, ftype: int) -> Path:
    """SOURCE quantized by llama.cpp's own quantizer (a llama_ftype: 15 is Q4_K_M)."""

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return out


@needs_patched_build
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "Q4_K"])
def test_quantized_projections_are_followed_as_ggml_rounds_their_input(tiny_models, kind, tmp_path):
    """Layer 0's q, k, v weights quantized: ggml multiplies them by its input rounded to 8-bit
    blocks (Q8_0; Q8_1 with block sums for Q4_1; Q8_K for K-quants), and the table does the same.
    Computed from the float32 input instead, the rows would miss by that rounding (1.4e-3 of the
    logits for Q8_0 and Q4_1)."""
    source, donor = tiny_models("llama")[0], None
    if kind == "Q4_K":  # K-quants' rows hold 256-value blocks, and llama.cpp writes them
        source = write_tiny(tmp_path / "wide.gguf", MODEL_ARCH.LLAMA, Shape(d=256, ffn=512))
        donor = quantized_by_llama_cpp(source, tmp_path / "q4_k_m.gguf", Q4_K_M)
    original = write_requantized(
        source, tmp_path / "original.gguf", GGMLQuantizationType[kind], donor
    )
    precomputed = export_gguf(original, tmp_path / "precomputed.gguf", "F32").out
    assert_decodes_alike(original, precomputed, FLOAT32_TOLERANCE)


@needs_patched_build
def test_batched_sequences_match_the_original(tiny):
    prompts = [PROMPT, PROMPT[3:], [256, 42, 300, 17]]
    expected_rows, expected_tokens = run_batched(tiny[0], prompts, 6)
    rows, tokens = run_batched(tiny[1], prompts, 6)
    assert relative_error(rows, expected_rows) < FLOAT32_TOLERANCE
    assert tokens == expected_tokens


@needs_patched_build
def test_a_table_of_the_wrong_width_is_refused_by_llama_cpp(tiny, tmp_path):
    """llama.cpp checks token_qkv's shape against the model's heads, as any weight's."""
    original, _ = tiny
    reader = GGUFReader(original)
    narrow = tmp_path / "narrow.gguf"
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(narrow, arch)
    copy_metadata(reader, writer)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.add_tensor_info("token_qkv.weight", (VOCAB, 7), np.float32, VOCAB * 7 * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.write_tensor_data(np.zeros((VOCAB, 7), np.float32))
    writer.close()
    with pytest.raises(FirstLayerError, match="token_qkv"):
        Engine(narrow)


def test_a_parallel_blocks_tied_head_keeps_the_plain_embedding(tmp_path):
    """Where token_embd comes to hold x + ffn(x), a head tied to it gets the plain rows as
    `output` (llama.cpp's GPT-NeoX graph has its own head; a tied parallel graph would not)."""
    original = write_tiny(tmp_path / "tied.gguf", MODEL_ARCH.GPTNEOX, tied=True)
    export = export_gguf(original, tmp_path / "precomputed.gguf", "F32")
    header = read_gguf_header(export.out)
    assert "output.weight" not in read_gguf_header(original).tensors
    assert header.metadata["firstlayer.untied_output"] is True
    with open(export.out, "rb") as file:
        file.seek(header.data_start + header.tensor_offsets["output.weight"])
        head = file.read(4 * VOCAB * 64)
    assert head == embedding_bytes(original) != embedding_bytes(export.out)


def stock_library() -> Path:
    """libllama built without the patch: `make llama-cpp` caches it beside the patched wheel, in
    its cache folder's stock/ (the same llama.cpp, the patch reversed)."""
    patch = Path(__file__).parents[1] / "llama.cpp" / "0001-token-qkv.patch"
    checksum = hashlib.sha256(patch.read_bytes()).hexdigest()[:12]
    version = importlib.metadata.version("llama_cpp_python")
    return cache_root() / "llama-cpp" / f"{version}-{checksum}" / "stock"


@needs_patched_build
def test_a_stock_llama_cpp_refuses_the_precomputed_file(tiny_models, tmp_path):
    """Unpatched, llama.cpp runs the original and refuses its precomputed twin while loading:
    layer 0's norm and q/k/v are missing. It never runs it."""
    stock = stock_library()
    assert (stock / "libllama.so").is_file(), f"no stock libllama in {stock}: run `make llama-cpp`"
    assert PATCH_MARKER not in (stock / "libllama.so").read_bytes()
    original, precomputed = tiny_models("llama")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(stock)}
    script = "import sys; from llama_cpp import Llama; Llama(sys.argv[1], n_ctx=64).eval([256, 72])"

    def load(path: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", script, str(path)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert load(original).returncode == 0
    refused = load(precomputed)
    assert refused.returncode != 0
    assert "tensor 'blk.0.attn_norm.weight' not found" in refused.stderr


def test_cli_convert_writes_a_gguf_for_an_out_ending_in_gguf(tiny_models, tmp_path, capsys):
    original, _ = tiny_models("llama")
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(original), str(out), "--table-dtype", "Q8_0"]) == 0
    assert "token_qkv in Q8_0" in capsys.readouterr().out
    table = next(t for t in GGUFReader(out).tensors if t.name == "token_qkv.weight")
    assert table.tensor_type == GGMLQuantizationType.Q8_0


def test_a_precomputed_or_unpatched_graph_is_refused_before_writing(tiny, tmp_path):
    _, precomputed = tiny
    with pytest.raises(FirstLayerError, match="precomputed already"):
        export_gguf(precomputed, tmp_path / "twice.gguf")
    assert not (tmp_path / "twice.gguf").exists()


# Transformers' float32 logits against llama.cpp's for the same weights: two engines' arithmetic.
ENGINES_TOLERANCE = 1e-3  # relative to the largest logit


@needs_patched_build
def test_a_hugging_face_folder_goes_through_llama_cpps_converter(tmp_path):
    """convert DIR OUT.gguf: llama.cpp's converter (which permutes q/k rows for its rotary
    layout) writes the GGUF, the table follows its rows: prompt and KV-cached decoding give
    transformers' own logits."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shipped = default_gguf_path()
    folder = tmp_path / "hf"
    tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    out = tmp_path / "precomputed.gguf"
    convert = ["convert", str(folder), str(out), "--dtype", "float32", "--table-dtype", "F32"]
    assert main(convert) == 0
    prompt = tokenizer("The capital of France is")["input_ids"]
    logits, tokens = run_llama(out, prompt, DECODE_STEPS)
    with torch.no_grad():  # the prompt and the tokens llama.cpp decoded, in one pass
        reference = model(torch.tensor([prompt + tokens[:-1]])).logits[0].numpy()
    assert relative_error(logits[: len(reference)], reference) < ENGINES_TOLERANCE


# --- SmolLM2-135M-Instruct: the real weights ---------------------------------------------------

SMOLLM2_PROMPT = b"The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory) -> dict[str, Path]:
    """The shipped file (Q4_1, its embedding Q8_0), its F32 dequantisation, and each one's
    export with an F32 table. Narrower tables: benchmarks/llama_cpp_agreement.py."""
    folder = tmp_path_factory.mktemp("smollm2-gguf")
    shipped = default_gguf_path()
    f32 = write_dequantized(GGUFReader(shipped), folder / "F32.gguf", GGMLQuantizationType.F32)
    return {
        "F32": f32,
        "F32+table": export_gguf(f32, folder / "F32-pre.gguf", "F32").out,
        "Q4_1": shipped,
        "Q4_1+table": export_gguf(shipped, folder / "Q4_1-pre.gguf", "F32").out,
    }


def smollm2_prompt(path: Path) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(SMOLLM2_PROMPT, add_bos=False)
    finally:
        llm.close()


@needs_patched_build
def test_smollm2_f32_precomputed_matches_the_original(smollm2_files):
    prompt = smollm2_prompt(smollm2_files["F32"])
    expected_logits, expected_tokens = run_llama(smollm2_files["F32"], prompt, DECODE_STEPS)
    logits, tokens = run_llama(smollm2_files["F32+table"], prompt, DECODE_STEPS)
    assert relative_error(logits, expected_logits) < FLOAT32_TOLERANCE
    assert tokens == expected_tokens


# The shipped Q4_1 file: the table follows ggml's quantized matmul (its input rounded to Q8_1
# blocks), bit for bit for most tokens; where numpy's float32 sum differs from ggml's in the last
# bit, a later layer's own Q8_1 rounding can turn that into another code and the logits part by a
# few percent (measured: exact for 19 of 24 positions, then 2e-2 to 4e-2, greedy tokens equal).
# Without the emulation (the float32 product) every position parts from the second on.
QUANTIZED_TOLERANCE = 0.1


@needs_patched_build
def test_smollm2_shipped_q4_1_precomputed_decodes_as_the_original(smollm2_files):
    prompt = smollm2_prompt(smollm2_files["F32"])
    expected_logits, expected_tokens = run_llama(smollm2_files["Q4_1"], prompt, DECODE_STEPS)
    logits, tokens = run_llama(smollm2_files["Q4_1+table"], prompt, DECODE_STEPS)
    assert tokens == expected_tokens
    assert relative_error(logits, expected_logits) < QUANTIZED_TOLERANCE
