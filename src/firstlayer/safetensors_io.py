"""A streaming safetensors writer: tensors arrive in chunks, so no whole table is ever in memory.

The file is the standard format (8-byte header length, JSON header, raw little-endian data), read
back by `safetensors.safe_open`. The header is sorted and holds no timestamps, so the same tensors
always give the same bytes.
"""

from __future__ import annotations

import json
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
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


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


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    chunks: Iterable[tuple[str, Tensor]],
    metadata: dict[str, str],
) -> None:
    """Write `specs` in order; `chunks` yields (name, part) pieces that join into each tensor."""
    expected = iter(specs)
    spec, written = next(expected, None), 0
    with open(path, "wb") as file:
        file.write(header_bytes(specs, metadata))
        for name, part in chunks:
            if spec is not None and written == spec.nbytes:
                spec, written = next(expected, None), 0
            assert spec is not None and name == spec.name, (name, spec)
            assert part.dtype == spec.dtype, (name, part.dtype, spec.dtype)
            data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            file.write(memoryview(data))
            written += data.nbytes
            assert written <= spec.nbytes, (name, written, spec.nbytes)
        assert spec is not None and written == spec.nbytes and next(expected, None) is None, (
            "tensors missing from the stream"
        )
