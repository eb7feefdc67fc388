"""Adapters (PEFT, LoRA) on a precomputed model: the original's answer, or a refusal by name."""

from __future__ import annotations

import pytest
from conftest import FAMILIES, build_tiny, clone

from firstlayer.conversion import convert
from firstlayer.errors import FirstLayerError
from firstlayer.hf.loading import load

LLAMA = next(f for f in FAMILIES if f.id == "llama")


@pytest.fixture(scope="module")
def adapter_and_folder(tmp_path_factory):
    """A tiny Llama converted, and a LoRA adapter on q/k/v/o and the MLP of every layer."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    model = build_tiny(LLAMA)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(clone(model), config).save_pretrained(root / "adapter")
    return root / "adapter", convert(model, root / "precomputed")


def test_peft_refuses_an_adapter_on_a_precomputed_model_by_name(adapter_and_folder):
    from peft import PeftModel

    adapter, folder = adapter_and_folder
    with pytest.raises(FirstLayerError, match="not applied exactly yet: layer 0's .*q_proj"):
        PeftModel.from_pretrained(load(folder), adapter)


def test_load_adapter_refuses_it_too(adapter_and_folder):
    adapter, folder = adapter_and_folder
    with pytest.raises(FirstLayerError, match="merge it there"):
        load(folder).load_adapter(adapter)
