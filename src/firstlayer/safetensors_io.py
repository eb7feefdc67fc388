"""A streaming safetensors writer: tensors arrive in chunks, so no whole table is ever in memory,
sharded as save_pretrained shards.

The file is the standard format (8-byte header length, JSON header, raw little-endian data), read
back by `safetensors.safe_open`. The header is sorted and holds no timestamps, so the same tensors
always give the same bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# As transformers used to default to: shards small enough for any file system and upload.
DEFAULT_MAX_SHARD_SIZE = "5GB"


def write_sharded(
    folder: Path,
    specs: list[TensorSpec],
    chunks: Iterable[tuple[str, Tensor]],
    metadata: dict[str, str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write `specs` as save_pretrained does: one model.safetensors, or shards split by
    huggingface_hub's own rule plus model.safetensors.index.json. Returns the files written.

    `chunks` arrive in the order of `specs`; each shard holds its tensors in that order, so every
    shard file is written front to back while the stream passes (a tensor larger than a shard
    gets one of its own, out of order with the others, which is why all shards stay open).
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        {spec.name: spec for spec in specs},
        get_storage_size=lambda spec: spec.nbytes,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    by_name = {spec.name: spec for spec in specs}
    shard_specs = {
        file: [by_name[name] for name in names] for file, names in split.filename_to_tensors.items()
    }
    writers = {file: _ShardWriter(folder / file, s, metadata) for file, s in shard_specs.items()}
    try:
        for name, part in chunks:
            writers[split.tensor_to_filename[name]].write(name, part)
    finally:
        for writer in writers.values():
            writer.close()
    for writer in writers.values():
        writer.assert_complete()
    files = sorted(shard_specs)
    if split.is_sharded:
        index = {
            "metadata": {
                "total_parameters": sum(spec.numel for spec in specs),
                **split.metadata,
            },
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_NAME)
    return files


class _ShardWriter:
    """One safetensors file written front to back from (name, part) pieces."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]):
        self.specs = iter(specs)
        self.spec, self.written = next(self.specs, None), 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(header_bytes(specs, metadata))

    def write(self, name: str, part: Tensor) -> None:
        if self.spec is not None and self.written == self.spec.nbytes:
            self.spec, self.written = next(self.specs, None), 0
        assert self.spec is not None and name == self.spec.name, (name, self.spec)
        assert part.dtype == self.spec.dtype, (name, part.dtype, self.spec.dtype)
        data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.written += data.nbytes
        assert self.written <= self.spec.nbytes, (name, self.written, self.spec.nbytes)

    def close(self) -> None:
        self.file.close()

    def assert_complete(self) -> None:
        complete = self.spec is not None and self.written == self.spec.nbytes
        assert complete and next(self.specs, None) is None, "tensors missing from the stream"
