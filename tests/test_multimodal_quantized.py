"""A quantized multimodal checkpoint (compressed-tensors, the vision tower and projector in
`ignore`, as llm-compressor writes them) is refused by name: its image positions need layer 0's
q/k/v, which would be kept quantized. Nothing is left behind."""

from __future__ import annotations

import json

import pytest
import quantized_checkpoints as qc
import torch
from safetensors.torch import load_file, save_file
from test_multimodal import build

from firstlayer.conversion import convert_checkpoint
from firstlayer.errors import FirstLayerError

# How llm-compressor's recipes for vision-language models leave the vision side unquantized.
IGNORE = ("lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*")


def w8a8_int8(folder) -> None:
    """The language model's decoder Linears as compressed-tensors INT8 W8A8 (static input)."""
    weights = folder / "model.safetensors"
    tensors = {}
    for name, tensor in load_file(weights).items():
        if "language_model" in name and ".layers." in name and name.endswith("proj.weight"):
            module = name.removesuffix(".weight")
            for part, value in qc.ct_int8_quant(tensor, torch.float32, True).items():
                tensors[f"{module}.{part}"] = value
        else:
            tensors[name] = tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qc.ct_config(
        {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        {"num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": True},
        "int-quantized",
        ignore=IGNORE,
    )
    (folder / "config.json").write_text(json.dumps(config))


def test_a_quantized_multimodal_checkpoint_is_refused_by_name(tmp_path):
    source = tmp_path / "llava-w8a8"
    build("llava").save_pretrained(source)
    w8a8_int8(source)
    with pytest.raises(FirstLayerError, match="llava model keeps layer 0's q/k/v.*quantized"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
