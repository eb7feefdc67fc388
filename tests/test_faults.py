"""Bad input, faults and integrity: one clear line, nothing lost, nothing silently wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FAMILIES, build_tiny

from firstlayer.cli import main
from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.folder import WEIGHTS_FILE, check
from firstlayer.hf.loading import load

ROOT = Path(__file__).resolve().parents[1]


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


@pytest.fixture
def llama_folder(tmp_path) -> Path:
    folder = tmp_path / "llama"
    build_tiny(family("llama")).save_pretrained(folder)
    return folder


@pytest.fixture
def converted(llama_folder, tmp_path) -> Path:
    out = tmp_path / "out"
    assert main(["convert", str(llama_folder), str(out)]) == 0
    return out


def fails_with(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI: exit code 2, one line on stderr naming the problem, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("firstlayer: error: "), err
    assert not any("Traceback" in e for e in err), err
    for word in words:
        assert word in line, (word, line)
    return line


def copy_with(folder: Path, tmp_path: Path, name: str, edit) -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    edit(copy)
    return copy


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# --- every command, bad input: one line naming the problem and the fix ----------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "{missing}"],
        ["convert", "{missing}", "{out}"],
        ["verify", "{missing}", "{out}"],
        ["generate", "{missing}", "hello"],
        ["bench", "{missing}"],
        ["check", "{missing}"],
    ],
    ids=lambda argv: argv[0],
)
def test_missing_path(argv, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    argv = [a.format(missing=missing, out=tmp_path / "out") for a in argv]
    fails_with(capsys, argv, "nowhere")


def test_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails_with(
        capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "out")], "config.json", ".gguf"
    )


def test_config_without_model_type(llama_folder, tmp_path, capsys):
    bad = copy_with(
        llama_folder, tmp_path, "bad", lambda f: edit_config(f, lambda c: c.pop("model_type"))
    )
    fails_with(capsys, ["convert", str(bad), str(tmp_path / "out")], "model_type")


def test_unsupported_family_names_the_supported_ones(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "granitemoeshared",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "source")
    fails_with(
        capsys,
        ["convert", str(tmp_path / "source"), str(tmp_path / "out")],
        "'granitemoeshared' is not supported yet",
        "llama",
        "gpt_neox",
        "falcon",
    )


def test_absolute_position_family_is_refused_with_the_reason(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    fails_with(
        capsys, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")], "position embedding"
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_safetensors_source(damage, llama_folder, tmp_path, capsys):
    def spoil(folder: Path) -> None:
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"x" * 100)

    bad = copy_with(llama_folder, tmp_path, "bad", spoil)
    fails_with(
        capsys,
        ["convert", str(bad), str(tmp_path / "out")],
        "model.safetensors",
        "corrupted or truncated",
    )
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path, capsys):
    from firstlayer.analysis.sources import default_gguf_path

    data = default_gguf_path().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    fails_with(
        capsys,
        ["convert", str(tmp_path / "cut.gguf"), str(tmp_path / "out")],
        "cut.gguf is truncated",
    )


def test_weights_whose_shapes_disagree_with_the_config(llama_folder, tmp_path, capsys):
    bad = copy_with(
        llama_folder,
        tmp_path,
        "bad",
        lambda f: edit_config(f, lambda c: c.update(intermediate_size=128)),
    )
    fails_with(
        capsys, ["convert", str(bad), str(tmp_path / "out")], "mlp", "config.json", "disagree"
    )


def test_tokenizer_and_embedding_of_different_vocabularies(llama_folder, tmp_path, capsys):
    from firstlayer.analysis.sources import default_gguf_path
    from firstlayer.hf.loading import load_tokenizer

    gguf = default_gguf_path()
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)  # 49,152 tokens; the model: 256
    bad = copy_with(llama_folder, tmp_path, "bad", tokenizer.save_pretrained)
    fails_with(capsys, ["convert", str(bad), str(tmp_path / "out")], "49,152 tokens", "256 rows")


def test_unsupported_dtype(llama_folder, tmp_path, capsys):
    fails_with(
        capsys,
        ["convert", str(llama_folder), str(tmp_path / "out"), "--dtype", "int8"],
        "int8",
        "float32, bfloat16, float16",
    )


# A fine-grained FP8 release (DeepSeek-V3, Qwen3-FP8), an int4 GPTQ one and a compressed-tensors
# one, as config.json declares them, over weights that are not quantized: refused, never
# written as a folder that claims to be quantized (tests/test_quantized.py converts real ones).
QUANTIZED = {
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "float-quantized"},
}


@pytest.mark.parametrize("method", list(QUANTIZED))
def test_a_quantization_config_over_plain_weights_is_refused(
    method, llama_folder, tmp_path, capsys
):
    source = copy_with(
        llama_folder,
        tmp_path,
        "quantized",
        lambda f: edit_config(f, lambda c: c.update(quantization_config=QUANTIZED[method])),
    )
    out = tmp_path / "out"
    fails_with(capsys, ["convert", str(source), str(out)], method, "no Linear is stored quantized")
    assert not out.exists()


def test_a_loaded_quantized_model_is_refused_not_dequantized_into_a_folder(tmp_path):
    """A model transformers dequantized as it loaded (FP8 on a CPU) would convert into a plain
    folder several times the checkpoint's size: refused, naming the checkpoint route."""
    model = build_tiny(family("llama"))
    model.config.quantization_config = QUANTIZED["fp8"]
    with pytest.raises(FirstLayerError, match="fp8 model loaded by transformers"):
        convert(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prompt_longer_than_the_context(smollm2_converted, capsys):
    prompt = "word " * 9000  # SmolLM2's context is 8,192 tokens
    fails_with(capsys, ["generate", str(smollm2_converted), prompt], "8192", "shorten")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FirstLayerError):
        main(["--debug", "convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    with pytest.raises(FirstLayerError):
        main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--debug"])


def test_exit_code_seen_by_a_shell(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "firstlayer.cli", "check", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# --- conversions that fail or are killed leave nothing that loads ----------------------------


def test_failed_conversion_leaves_nothing(llama_folder, tmp_path):
    model = build_tiny(family("llama"))

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the table

    with pytest.raises(KeyboardInterrupt):
        convert(model, tmp_path / "out", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_failed_forced_conversion_keeps_the_old_output(converted, tmp_path):
    before = (converted / WEIGHTS_FILE).read_bytes()

    def fail(done: int, total: int) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        convert(build_tiny(family("llama"), seed=1), converted, force=True, progress=fail)
    assert (converted / WEIGHTS_FILE).read_bytes() == before
    check(converted)


KILLED_CONVERSION = textwrap.dedent(
    """
    import sys, time
    import firstlayer.table.build
    from transformers import AutoModelForCausalLM
    from firstlayer.conversion import convert

    firstlayer.table.build.CHUNK_ROWS = 4  # many small chunks, so that the kill lands mid-way
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])

    def slowly(done, total):
        print("ROWS", done, flush=True)
        time.sleep(0.05)

    convert(model, sys.argv[2], progress=slowly)
    """
)


def test_conversion_killed_midway_leaves_no_folder_that_loads(llama_folder, tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERSION, str(llama_folder), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in child.stdout:
        if line.startswith("ROWS") and int(line.split()[1]) >= 100:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.firstlayer-tmp-")]
    assert len(leftovers) == 1 and not (leftovers[0] / "config.json").exists()
    with pytest.raises(FirstLayerError):
        load(leftovers[0])
    # The next conversion to the same place clears what the killed one left.
    assert main(["convert", str(llama_folder), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]
    check(out)


# --- integrity ------------------------------------------------------------------------------


def test_check_passes_on_an_intact_folder(converted, capsys):
    assert main(["check", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors: sha256 ok" in out and out.strip().endswith("OK")


def test_check_fails_on_an_edited_weight_file(converted, capsys):
    weights = converted / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    fails_with(capsys, ["check", str(converted)], "model.safetensors", "checksum")
    load(converted)  # the cheap checks on load see nothing: only `check` reads every byte


def test_truncated_weight_file_fails_check_and_load(converted, capsys):
    weights = converted / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4096])
    fails_with(capsys, ["check", str(converted)], "truncated")
    with pytest.raises(FirstLayerError, match="truncated"):
        load(converted)


def test_missing_weight_file_fails_load(converted):
    (converted / WEIGHTS_FILE).unlink()
    with pytest.raises(FirstLayerError, match="missing"):
        load(converted)


def test_folder_mixed_from_two_conversions_fails_check(converted, tmp_path, capsys):
    other = tmp_path / "other"
    convert(build_tiny(family("llama"), seed=7), other)  # same shapes, other weights
    shutil.copy(other / WEIGHTS_FILE, converted / WEIGHTS_FILE)
    fails_with(capsys, ["check", str(converted)], "checksum", "another conversion")


def test_config_edited_to_another_shape_fails_load(converted):
    edit_config(converted, lambda c: c.update(hidden_size=32, head_dim=8))
    with pytest.raises(FirstLayerError, match="layout|does not match|disagree"):
        load(converted)


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_conversion_of_a_262k_vocabulary_stays_near_the_model_size():
    """Peak RSS of `firstlayer convert` over a process that only imports: <= 1.5x the model."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "convert_memory.py"),
            "--hidden",
            "512",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout)
    assert result["vocab_size"] == 262_144
    assert result["converted_file_mib"] > result["model_float32_mib"]  # the table is wider
    assert result["ratio_to_model"] <= 1.5, result
