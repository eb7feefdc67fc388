"""The one table lookup, shared by the transformers runtime and the vLLM plugin: rows of a stored
block for token ids, in the model's dtype, on the ids' device.

Where the table lives, one vocabulary for both engines (`TABLE_MEMORY`):

    device  with the model's weights, in its stored dtype (vLLM's default)
    host    in host memory, page-locked where there is CUDA: each call gathers its B x T rows on
            the host and copies only those to the accelerator
    mapped  the folder's safetensors file, memory-mapped: on disk, pages resident only for the
            rows read; otherwise as `host` (transformers' default; vLLM loads weights itself)
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.table.codec import dequantize_int8

TABLE_MEMORY = ("device", "host", "mapped")
# What transformers' `table_memory=` called `host` before the vocabulary was shared.
DEPRECATED_TABLE_MEMORY = {"pinned": "host"}


def parse_table_memory(memory: str, allowed: tuple[str, ...] = TABLE_MEMORY) -> str:
    """A placement by its name in the shared vocabulary, refused by name when unknown."""
    if memory in DEPRECATED_TABLE_MEMORY:
        new = DEPRECATED_TABLE_MEMORY[memory]
        warnings.warn(f"table_memory={memory!r} is now called {new!r}", FutureWarning, stacklevel=3)
        memory = new
    if memory not in allowed:
        raise FirstLayerError(f"table_memory={memory!r} is not one of {', '.join(allowed)}")
    return memory


def gather_rows(
    stored: Tensor,
    ids: Tensor,
    dtype: torch.dtype,
    scales: Tensor | None = None,
    column_segment: Tensor | None = None,
    staging: HostStaging | None = None,
) -> Tensor:
    """Rows `ids` (any shape) of a stored block (V, W): (*ids.shape, W) in `dtype` on the ids'
    device. An int8 block's codes are multiplied by their row's scale of each column's segment;
    a block kept in host memory sends only the rows looked up, through `staging`."""
    device = ids.device
    if scales is None and stored.dtype == dtype and stored.device == device:
        return nn.functional.embedding(ids, stored)
    at = ids.to(stored.device)  # a host-kept block: the ids cross once, the rows back
    if scales is None:
        rows = nn.functional.embedding(at, stored)
    else:
        rows = dequantize_int8(stored[at], scales[at], column_segment)
    if rows.device == device:
        return rows.to(dtype)
    return (staging or HostStaging()).to_device(rows, dtype, device)


@dataclass
class _Slot:
    buffer: Tensor  # page-locked, flat
    copied: torch.cuda.Event  # recorded after the last copy out of `buffer` was queued


class HostStaging:
    """The page-locked buffers a host-kept block's rows cross to a CUDA device through, reused
    from call to call rather than allocated each step. Each thread alternates between two of its
    own, and waits on a buffer's last copy (queued two calls ago, long done) before writing it
    again: a copy still in flight is never overwritten, and concurrent calls never share one."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}  # buffers belong to this process's threads: a copy starts with none

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def to_device(self, rows: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Host rows as `dtype` on `device`, the conversion done while staging."""
        if device.type != "cuda":
            return rows.to(device=device, dtype=dtype)
        slots = getattr(self._local, "slots", None)
        if slots is None:
            slots = self._local.slots = [None, None]
            self._local.turn = 0
        turn = self._local.turn
        self._local.turn = 1 - turn
        slot = slots[turn]
        count = rows.numel()
        if slot is None or slot.buffer.numel() < count or slot.buffer.dtype != dtype:
            buffer = torch.empty(count, dtype=dtype, pin_memory=True)
            slot = slots[turn] = _Slot(buffer, torch.cuda.Event())
        else:
            slot.copied.synchronize()  # the host waits for a copy queued two calls ago
        staged = slot.buffer[:count].view(rows.shape)
        staged.copy_(rows)
        out = staged.to(device, non_blocking=True)
        slot.copied.record(torch.cuda.current_stream(device))
        return out
