"""Converted folders in mlx-lm (issue 26): its own loader, generate, CLI and converter run them
with mlx-lm's own model classes, giving what mlx-lm gives for the original folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

mlx_lm = pytest.importorskip(
    "mlx_lm", reason="mlx-lm is installed in .venv only (`pip install 'firstlayer[mlx]'`)"
)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from conftest import FAMILIES, build_tiny  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from firstlayer.conversion import convert  # noqa: E402
from firstlayer.errors import FirstLayerError  # noqa: E402
from firstlayer.folder import MLX_MODEL_FILE  # noqa: E402
from firstlayer.mlx.models import legacy_rope_fields, refuse_unsupported_version  # noqa: E402

# Both models run in float32 on mlx's CPU kernels; the table's rows came from transformers' float32
# layer 0, which rounds differently from mlx's own by a few units in the last place.
FLOAT32_ROUNDING = 1e-5

# What the test configs change so that mlx-lm 0.32 runs the original at all: its GPT-NeoX MLP is
# 4 x hidden and always the tanh GELU (transformers' `gelu_fast`; with `gelu` mlx-lm's own model
# departs from the original), its Phi has no q/k LayerNorms, and its Gemma 3, Cohere 2 and OLMo 3
# index a full-attention layer past a 2-layer model.
MLX_RUNS_ORIGINAL = {
    "gpt_neox": dict(hidden_act="gelu_fast", intermediate_size=256),
    "gpt_neox_serial": dict(hidden_act="gelu_fast", intermediate_size=256),
    "phi": dict(qk_layernorm=False),
    "gemma3_text": dict(num_hidden_layers=6),
    "cohere2": dict(num_hidden_layers=4),
    "olmo3": dict(num_hidden_layers=4),
    "llama": dict(rope_theta=500000.0),  # not mlx-lm's default: read from the config
}
# Families both have whose original folder (as transformers 5 saves it) mlx-lm 0.32.2 does not
# run, so there is nothing to compare with; and families mlx-lm has no model for.
NOT_IN_MLX = {
    "olmo": "mlx-lm's OLMo imports the ai2-olmo package and exits without it",
    "qwen3_moe": "mlx-lm reads `num_experts`, which transformers 5 writes otherwise",
    "exaone4": "mlx-lm requires `head_dim` and `rope_scaling` in the config",
    "apertus": "mlx-lm requires `mlp_bias`, `post_norm` and `qk_norm` in the config",
    "gpt_oss": "mlx-lm does not read transformers 5's expert tensors",
    "phimoe": "mlx-lm's PhiMoE expects attention and LM-head biases the config has not",
    "falcon": "no mlx-lm model",
    "falcon_new": "no mlx-lm model",
    "bloom": "no mlx-lm model",
    "mpt": "no mlx-lm model",
    "arcee": "no mlx-lm model",
}
MLX_FAMILIES = [f for f in FAMILIES if f.id not in NOT_IN_MLX]
PROMPT = [[5, 17, 200, 3, 9, 44, 100, 7]]
DECODE_STEPS = 6


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over the tiny vocabulary ("w3 w17 ..."), which mlx-lm needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@dataclasses.dataclass(frozen=True)
class Folders:
    original: Path
    precomputed: Path


@pytest.fixture(scope="session")
def mlx_folders(tmp_path_factory):
    """family id -> the original folder as published (RoPE settings under the top-level names
    mlx-lm reads) and its `firstlayer convert`ed folder, written once per session."""
    made: dict[str, Folders] = {}

    def folders(family_id: str, **extra) -> Folders:
        key = family_id + json.dumps(extra, sort_keys=True)
        if key not in made:
            family = next(f for f in FAMILIES if f.id == family_id)
            settings = {**family.extra, **MLX_RUNS_ORIGINAL.get(family_id, {})}
            model = build_tiny(dataclasses.replace(family, extra=settings))
            tokenizer = tiny_tokenizer(model.config.vocab_size)
            root = tmp_path_factory.mktemp(f"mlx-{family_id}")
            model.save_pretrained(root / "original")
            tokenizer.save_pretrained(root / "original")
            config_file = root / "original" / "config.json"
            config = json.loads(config_file.read_text())
            config_file.write_text(json.dumps({**legacy_rope_fields(config), **config}))
            precomputed = convert(model, root / "precomputed", tokenizer=tokenizer, **extra)
            made[key] = Folders(root / "original", precomputed)
        return made[key]

    return folders


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max())


def prompt_and_decode_logits(model) -> list[mx.array]:
    """Logits over the prompt, then over greedy KV-cached decode steps."""
    cache = make_prompt_cache(model)
    logits = [model(mx.array(PROMPT), cache=cache)]
    for _ in range(DECODE_STEPS):
        token = mx.argmax(logits[-1][:, -1:], axis=-1)
        logits.append(model(token, cache=cache))
    return logits


@pytest.mark.parametrize("family", MLX_FAMILIES, ids=[f.id for f in MLX_FAMILIES])
def test_precomputed_logits_match_mlx_original(family, mlx_folders):
    """Over a prompt and KV-cached greedy decoding, the converted folder's logits in mlx-lm are
    the original folder's in mlx-lm, to float32 rounding."""
    folders = mlx_folders(family.id)
    original, _ = mlx_lm.load(str(folders.original))
    precomputed, _ = mlx_lm.load(str(folders.precomputed), trust_remote_code=True)
    expected = prompt_and_decode_logits(original)
    got = prompt_and_decode_logits(precomputed)
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert max_diff(a, b) <= FLOAT32_ROUNDING, (family.id, step)
    assert "FirstLayer" in type(precomputed).__name__
    assert type(original).__mro__[0] in type(precomputed).__mro__  # mlx-lm's own class


@pytest.mark.parametrize("family_id", ["llama", "gpt_neox", "gemma"])
def test_generate_api_gives_the_original_tokens(family_id, mlx_folders):
    folders = mlx_folders(family_id)
    original, tokenizer = mlx_lm.load(str(folders.original))
    precomputed, _ = mlx_lm.load(str(folders.precomputed), trust_remote_code=True)
    prompt = "w5 w17 w200 w3 w9"
    expected = mlx_lm.generate(original, tokenizer, prompt, max_tokens=12)
    assert mlx_lm.generate(precomputed, tokenizer, prompt, max_tokens=12) == expected
    streamed = "".join(r.text for r in mlx_lm.stream_generate(precomputed, tokenizer, prompt, 12))
    assert streamed == expected
    prompts = [tokenizer.encode(p) for p in (prompt, "w9 w8", "w100 w101 w102 w103 w104 w105")]
    batched = [
        mlx_lm.batch_generate(m, tokenizer, prompts, max_tokens=8).texts
        for m in (original, precomputed)
    ]
    assert batched[0] == batched[1]


def test_generate_cli_gives_the_original_tokens(mlx_folders, monkeypatch, capsys):
    from mlx_lm.generate import main

    folders = mlx_folders("qwen3")
    outputs = []
    for folder, trust in ((folders.original, []), (folders.precomputed, ["--trust-remote-code"])):
        argv = ["mlx_lm.generate", "--model", str(folder), "--prompt", "w5 w17 w200", *trust]
        monkeypatch.setattr(sys, "argv", [*argv, "--max-tokens", "12", "--temp", "0"])
        main()
        outputs.append(capsys.readouterr().out.split("==========")[1])
    assert outputs[0] == outputs[1] and outputs[0].strip()


# A chat template for the tiny tokenizer: mlx_lm.chat and the server's chat endpoint apply one.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def chat_folders(mlx_folders, tmp_path_factory) -> Folders:
    """The qwen3 pair, each with a chat template."""
    folders, root = mlx_folders("qwen3"), tmp_path_factory.mktemp("mlx-chat")
    copies = []
    for name in ("original", "precomputed"):
        copy = root / name
        shutil.copytree(getattr(folders, name), copy)
        (copy / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        copies.append(copy)
    return Folders(*copies)


def test_chat_cli_gives_the_original_replies(chat_folders):
    """`mlx_lm chat`, two turns (the second on the first's KV cache), greedy by default."""
    replies = []
    for folder, trust in (
        (chat_folders.original, []),
        (chat_folders.precomputed, ["--trust-remote-code"]),
    ):
        command = [sys.executable, "-m", "mlx_lm", "chat", "--model", str(folder), *trust]
        done = subprocess.run(
            [*command, "--max-tokens", "8"],
            input="w5 w17 w200\nw9 w3\nq\n",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        # Each reply is streamed onto one line, then a line of its figures ("8 tokens · ...").
        replies.append([lines[i - 1] for i, line in enumerate(lines) if " tokens · " in line])
    assert len(replies[0]) == 2 and replies[0] == replies[1]
    assert all(any(c.isdigit() for c in reply) for reply in replies[0])


def vllm_server_helpers():
    """benchmarks/vllm_server.py (standard library only), by path: free_port and call."""
    path = Path(__file__).parents[1] / "benchmarks" / "vllm_server.py"
    spec = importlib.util.spec_from_file_location("firstlayer_vllm_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_answers_as_for_the_original(chat_folders, tmp_path):
    """`mlx_lm server`: a greedy completion and a chat with the original's text and logprobs."""
    helpers = vllm_server_helpers()
    answers = []
    for folder, trust in (
        (chat_folders.original, []),
        (chat_folders.precomputed, ["--trust-remote-code"]),
    ):
        port = helpers.free_port()
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), *trust]
        log = tmp_path / f"{folder.name}.log"
        with open(log, "w") as sink:  # a pipe would fill up and stall the server
            server = subprocess.Popen(
                [*command, "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT
            )
        try:
            for _ in range(600):
                assert server.poll() is None, log.read_text()[-2000:]
                if helpers.call(port, "/health", timeout=5)[0] == 200:
                    break
                time.sleep(0.1)
            sampling = {"max_tokens": 8, "temperature": 0, "logprobs": True}
            completion = {"prompt": "w5 w17 w200", **sampling}
            chat = {"messages": [{"role": "user", "content": "w9 w3"}], **sampling}
            answer = []
            for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
                status, text = helpers.call(port, path, body, timeout=120)
                assert status == 200, text
                answer.append(json.loads(text)["choices"][0])
            answers.append(answer)
        finally:
            server.terminate()
            server.wait(timeout=30)
    (completion, chat), (got_completion, got_chat) = answers
    assert got_completion["text"] == completion["text"] and completion["text"].strip()
    assert got_chat["message"]["content"] == chat["message"]["content"]
    for expected, got in ((completion, got_completion), (chat, got_chat)):
        tokens = [(t["id"], t["logprob"]) for t in expected["logprobs"]["content"]]
        got_tokens = [(t["id"], t["logprob"]) for t in got["logprobs"]["content"]]
        assert [t for t, _ in got_tokens] == [t for t, _ in tokens] and len(tokens) == 8
        assert max(abs(a - b) for (_, a), (_, b) in zip(tokens, got_tokens, strict=True)) < 1e-4


def test_converted_folder_names_its_mlx_module(mlx_folders):
    folder = mlx_folders("llama").precomputed
    config = json.loads((folder / "config.json").read_text())
    assert config["model_file"] == MLX_MODEL_FILE
    assert MLX_MODEL_FILE in config["firstlayer"]["files"]  # checksummed like every file


def test_refused_without_trust_remote_code(mlx_folders):
    with pytest.raises(ValueError, match=MLX_MODEL_FILE):
        mlx_lm.load(str(mlx_folders("llama").precomputed))


def test_refused_without_firstlayer(mlx_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "firstlayer.mlx.models", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'firstlayer\[mlx\]'"):
        mlx_lm.load(str(mlx_folders("llama").precomputed), trust_remote_code=True)


@pytest.mark.parametrize("version", ["0.31.3", "0.33.0"])
def test_mlx_lm_outside_the_tested_range_is_refused(version, mlx_folders, monkeypatch):
    with pytest.raises(FirstLayerError, match=r"mlx-lm >=0\.32\.0,<0\.33"):
        refuse_unsupported_version(version)
    # Through mlx-lm's loader: the folder's module imports firstlayer's, which checks on import.
    monkeypatch.setattr(mlx_lm, "__version__", version)
    monkeypatch.delitem(sys.modules, "firstlayer.mlx.models")
    with pytest.raises(FirstLayerError, match=f"mlx-lm {version} is installed"):
        mlx_lm.load(str(mlx_folders("llama").precomputed), trust_remote_code=True)


def test_input_embeddings_are_refused(mlx_folders):
    model, _ = mlx_lm.load(str(mlx_folders("llama").precomputed), trust_remote_code=True)
    embeddings = model.model.embed_tokens(mx.array(PROMPT))
    with pytest.raises(FirstLayerError, match="input embeddings"):
        model(mx.array(PROMPT), input_embeddings=embeddings)


def test_table_dtypes_read_as_transformers_reads_them(mlx_folders):
    """An int8 table (per-row scales) and a bfloat16 one run in mlx-lm with the logits
    transformers computes from the same folder."""
    import torch

    from firstlayer.hf.loading import load

    for table_dtype in ("int8", "bfloat16"):
        folder = mlx_folders("gpt_neox", table_dtype=table_dtype).precomputed
        model, _ = mlx_lm.load(str(folder), trust_remote_code=True)
        with torch.no_grad():
            expected = load(folder)(torch.tensor(PROMPT)).logits.numpy()
        assert max_diff(model(mx.array(PROMPT)), mx.array(expected)) <= FLOAT32_ROUNDING


def test_int8_table_stays_int8_in_mlx(mlx_folders):
    """An int8 table is held as its codes and scales, dequantized per looked-up row to what
    `table.codec.dequantize_int8` gives from the folder's tensors, to the bit."""
    import torch
    from safetensors.torch import load_file

    from firstlayer.table.codec import column_segments, dequantize_int8
    from firstlayer.table.layout import SCALE_SUFFIX, TableLayout, segments

    folder = mlx_folders("gpt_neox", table_dtype="int8").precomputed
    model, _ = mlx_lm.load(str(folder), trust_remote_code=True)
    table = model.model.embed_in
    record = json.loads((folder / "config.json").read_text())["firstlayer"]
    layout = TableLayout.from_dict(record["table"])
    stored = {}
    for file in folder.glob("*.safetensors"):
        stored.update(load_file(file))
    ids = list(range(0, model.args.vocab_size, 7))
    for block in ("residual", "qkv"):
        rows = getattr(table, block)
        assert rows.codes.dtype == mx.int8 and "weight" not in rows
        name = f"{record['table']['module']}.{block}"
        segment = column_segments(segments(layout, block))
        expected = dequantize_int8(stored[name][ids], stored[name + SCALE_SUFFIX][ids], segment)
        got = rows(mx.array(ids)).astype(mx.float32)
        assert torch.equal(torch.from_numpy(np.array(got)), expected), block


def test_lora_on_layer_0_is_refused_by_name(mlx_folders):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    settings = {"rank": 4, "scale": 1.0, "dropout": 0.0}
    model, _ = mlx_lm.load(str(mlx_folders("llama").precomputed), trust_remote_code=True)
    linear_to_lora_layers(model, 1, settings)  # the last layer: as for the original
    with pytest.raises(FirstLayerError, match="layer 0"):
        linear_to_lora_layers(model, 2, settings)
    with pytest.raises(ValueError, match="PrecomputedLayer0Projection"):  # DoRA asks no module
        linear_to_lora_layers(model, 2, settings, use_dora=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_by_mlx_convert(bits, mlx_folders, tmp_path):
    """`mlx_lm.convert --quantize` keeps the module, quantizes the table like an embedding, and
    the result loads and generates."""
    from mlx_lm.convert import convert as mlx_convert

    folders = mlx_folders("llama")
    out = tmp_path / "quantized"
    mlx_convert(
        str(folders.precomputed), str(out), quantize=True, q_bits=bits, trust_remote_code=True
    )
    assert (out / MLX_MODEL_FILE).is_file()
    model, tokenizer = mlx_lm.load(str(out), trust_remote_code=True)
    table = model.model.embed_tokens
    assert {type(table.residual).__name__, type(table.qkv).__name__} == {"QuantizedEmbedding"}
    assert table.qkv.bits == bits
    assert mlx_lm.generate(model, tokenizer, "w5 w17", max_tokens=4)


def test_bench_engine_mlx_times_both_folders(tmp_path, capsys):
    from firstlayer.cli import main

    config = next(f for f in FAMILIES if f.id == "llama").config().to_dict()
    source = tmp_path / "tiny-llama.json"
    source.write_text(json.dumps(config))
    argv = ["bench", str(source), "--engine", "mlx", "--batch", "1", "--new-tokens", "4"]
    assert main([*argv, "--prompt-tokens", "4", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"].startswith(f"mlx-lm {mlx_lm.__version__}")
    (row,) = result["results"]
    assert row["decode_ceiling"] > 1 and row["decode_ms"]["ratio"]["median"] > 0
    assert row["decode_ms"]["original"]["low"] <= row["decode_ms"]["original"]["high"]
    assert result["repeats"] == 2
