"""Out-of-core conversion of a safetensors folder, and the self-check every conversion runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_tiny
from safetensors.torch import save_file

import firstlayer.table.build
from firstlayer.cli import main
from firstlayer.conversion import NeedsLoading, convert, convert_checkpoint, convert_source
from firstlayer.errors import FirstLayerError
from firstlayer.folder import check
from firstlayer.safetensors_io import INDEX_NAME

# These MoE checkpoints store their experts one by one; transformers fuses them when it loads.
FUSED_ON_LOADING = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "phimoe")
STREAMED = [f for f in FAMILIES if f.model_type not in FUSED_ON_LOADING]


def family(family_id: str):
    return next(f for f in FAMILIES if f.id == family_id)


def saved(family_id: str, folder: Path, max_shard_size: str = "40KB", seed: int = 0) -> Path:
    build_tiny(family(family_id), seed=seed).save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.mark.parametrize("case", STREAMED, ids=[f.id for f in STREAMED])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_out_of_core_output_is_the_in_memory_output_byte_for_byte(case, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    source = saved(case.id, tmp_path / "source")
    assert len(json.loads((source / INDEX_NAME).read_text())["weight_map"]) > 0
    loaded = AutoModelForCausalLM.from_pretrained(source)
    in_memory = convert(loaded, tmp_path / "in_memory", dtype=dtype, max_shard_size="30KB")
    streamed = convert_checkpoint(source, tmp_path / "streamed", dtype=dtype, max_shard_size="30KB")
    assert len(list(streamed.glob("*.safetensors"))) > 2
    assert same_files(in_memory, streamed) == []
    check(streamed)


def test_checkpoints_transformers_fuses_on_loading_are_loaded_first(tmp_path):
    source = saved("mixtral", tmp_path / "source")
    with pytest.raises(NeedsLoading):
        convert_checkpoint(source, tmp_path / "out")
    out, how = convert_source(str(source), tmp_path / "out")
    assert how == "loaded in memory" and (out / "config.json").is_file()


def test_self_check_catches_a_corrupted_row(tmp_path, monkeypatch):
    source = saved("qwen3", tmp_path / "source")
    qkv = firstlayer.table.build.TokenLocal.qkv

    def one_row_off(self, ids):
        rows = qkv(self, ids).clone()
        rows[ids == 77, 5] += 0.25  # a bug that touches one entry of one row
        return rows

    monkeypatch.setattr(firstlayer.table.build.TokenLocal, "qkv", one_row_off)
    with pytest.raises(FirstLayerError, match="self-check failed: .*token id 77, column 69"):
        convert_checkpoint(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # nothing left


def test_verify_rows_reads_back_an_existing_folder(tmp_path, capsys):
    source = saved("gpt_neox", tmp_path / "source")
    out = convert_checkpoint(source, tmp_path / "out", max_shard_size="30KB")
    assert main(["verify", str(source), str(out), "--rows", "64"]) == 0
    assert "64 table rows read back" in capsys.readouterr().out
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    shard = out / index["gpt_neox.embed_in.qkv"]
    with open(shard, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    start = 8 + header_len + header["gpt_neox.embed_in.qkv"]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    data[start : start + 4] = torch.tensor([9.0]).numpy().tobytes()  # row 0, column 0
    shard.write_bytes(bytes(data))
    assert main(["verify", str(source), str(out), "--rows", "64"]) == 1
    assert "token id 0, column 64" in capsys.readouterr().out


def test_a_shard_missing_from_the_folder(tmp_path):
    source = saved("llama", tmp_path / "source")
    shard = sorted(source.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FirstLayerError, match=f"{shard.name} is missing"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tensor_of_another_shape(tmp_path):
    source = saved("llama", tmp_path / "source", max_shard_size="5GB")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(FirstLayerError, match="mlp.*is \\[96, 64\\], but config.json makes it"):
        convert_checkpoint(source, tmp_path / "out")


def test_a_checkpoint_without_layer_0(tmp_path):
    model = build_tiny(family("llama"))
    source = tmp_path / "source"
    model.config.save_pretrained(source)
    tensors = {k: v.clone() for k, v in model.state_dict().items() if ".layers.0." not in k}
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FirstLayerError, match="holds no tensor 'model.layers.0."):
        convert_checkpoint(source, tmp_path / "out")


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from firstlayer.conversion import convert_checkpoint
    from firstlayer.errors import FirstLayerError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail, nothing is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    try:
        convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="5GB")
    except OSError as error:
        print("FAILED", error.strerror)
    """
)


@pytest.mark.slow
def test_a_disk_that_fills_up_midway_leaves_nothing(tmp_path):
    source = saved("llama", tmp_path / "source", max_shard_size="5GB")
    assert (source / "model.safetensors").stat().st_size > 60_000
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(source), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("FAILED"), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


PEAK_MEMORY = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM  # the imports a conversion needs
    from firstlayer.conversion import convert_checkpoint

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    baseline = status_kib("VmRSS")
    convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="100MB")
    print((status_kib("VmHWM") - baseline) * 1024)
    """
)


@pytest.mark.slow
def test_peak_memory_stays_under_half_a_checkpoint_whose_layers_dominate(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=24,
        vocab_size=4096,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(
        tmp_path / "source", max_shard_size="100MB"
    )
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "source").glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "source"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    added = int(result.stdout.split()[-1])
    print(
        f"checkpoint {checkpoint_bytes / 2**20:.0f} MiB, conversion added {added / 2**20:.0f} MiB"
    )
    assert added < checkpoint_bytes / 2, (added, checkpoint_bytes)
