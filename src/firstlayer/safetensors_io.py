"""A streaming safetensors writer: tensors arrive in chunks, so no whole table is ever in memory,
sharded as save_pretrained shards.

The file is the standard format (8-byte header length, JSON header, raw little-endian data), read
back by `safetensors.safe_open`. The header is sorted and holds no timestamps, so the same tensors
always give the same bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from firstlayer.errors import FirstLayerError

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint32: "U32",  # mlx-lm's packed quantized weights
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    # FP8 checkpoints: e4m3 weights, and ue8m0 block scales.
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
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
# Shards small enough for any file system and upload (what most published checkpoints use).
DEFAULT_MAX_SHARD_SIZE = "5GB"


def write_sharded(
    folder: Path,
    specs: list[TensorSpec],
    streams: Iterable[Iterable[tuple[str, Tensor]]],
    metadata: dict[str, str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    final_metadata: Callable[[], dict[str, str]] | None = None,
) -> list[str]:
    """Write `specs` as save_pretrained does: one model.safetensors, or shards split by
    huggingface_hub's own rule plus model.safetensors.index.json. Returns the files written.

    Each stream yields (name, part) pieces that join, in order, into its tensors; the streams
    hold disjoint tensors and run at once, the first in this thread and each other in a thread
    of its own, so that computing a table overlaps copying other weights (torch, reads and
    writes release the GIL). Every piece is written at its own offset, so the files are the
    same whatever the interleaving. `final_metadata()`, called once every stream is consumed,
    replaces values of `metadata` known only then (a fingerprint of what streamed through) by
    ones of the same length.
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
    shards = {file: _Shard(folder / file, s, metadata) for file, s in shard_specs.items()}
    placed = {name: shards[file] for name, file in split.tensor_to_filename.items()}
    try:
        _consume_at_once(list(streams), lambda name, part: placed[name].write(name, part))
        for shard in shards.values():
            shard.assert_complete()
            if final_metadata is not None:
                shard.rewrite_header(final_metadata())
    finally:
        for shard in shards.values():
            shard.close()
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


def _consume_at_once(
    streams: list[Iterable[tuple[str, Tensor]]], write: Callable[[str, Tensor], None]
) -> None:
    """Write every stream's pieces, the first stream in this thread, the others in threads of
    their own. A failure (Ctrl-C included) in any stops them all and is raised here."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def consume(stream: Iterable[tuple[str, Tensor]]) -> None:
        try:
            for name, part in stream:
                if stop.is_set():
                    return
                write(name, part)
        except BaseException as error:
            failures.append(error)
            stop.set()

    others = [threading.Thread(target=consume, args=(s,), daemon=True) for s in streams[1:]]
    for thread in others:
        thread.start()
    try:
        consume(streams[0])
    finally:
        if failures:
            stop.set()
        for thread in others:
            thread.join()
    if failures:
        raise failures[0]


class _Shard:
    """One safetensors file: its header first, then each tensor's pieces at their offsets."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]):
        self.specs = specs
        self.header = header_bytes(specs, metadata)
        self.offsets, offset = {}, len(self.header)
        for spec in specs:
            self.offsets[spec.name] = offset
            offset += spec.nbytes
        self.written = {spec.name: 0 for spec in specs}
        self.nbytes = {spec.name: spec.nbytes for spec in specs}
        self.dtypes = {spec.name: spec.dtype for spec in specs}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, self.header, 0)

    def write(self, name: str, part: Tensor) -> None:
        assert part.dtype == self.dtypes[name], (name, part.dtype, self.dtypes[name])
        data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        position = self.offsets[name] + self.written[name]
        view = memoryview(data)
        while view:  # pwrite may write less than asked
            count = os.pwrite(self.fd, view, position)
            view, position = view[count:], position + count
        self.written[name] += data.nbytes
        assert self.written[name] <= self.nbytes[name], (name, self.written[name])

    def rewrite_header(self, metadata: dict[str, str]) -> None:
        header = header_bytes(self.specs, metadata)
        assert len(header) == len(self.header), "final metadata must keep the header's length"
        os.pwrite(self.fd, header, 0)

    def close(self) -> None:
        os.close(self.fd)

    def assert_complete(self) -> None:
        missing = [n for n, size in self.nbytes.items() if self.written[n] != size]
        assert not missing, f"tensors missing from the stream: {missing[:3]}"


class SafetensorsFolder:
    """Reads tensors, or ranges of their rows, from a folder's safetensors files (one file or
    shards with an index) by plain file reads: nothing is memory-mapped, so what a reader holds
    is only what it asked for, however large the checkpoint."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise FirstLayerError(f"{index} is not a valid index ({error})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise FirstLayerError(
                    f"{path} is missing: {INDEX_NAME} names it; download the checkpoint again"
                )
            for tensor, entry in read_header(path).items():
                self.entries[tensor] = entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows start:stop of a tensor (its first dimension), read from disk."""
        path, dtype, shape, offset = self.entries[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        data = bytearray((stop - start) * row_bytes)
        with open(path, "rb") as file:
            file.seek(offset + start * row_bytes)
            if file.readinto(data) != len(data):
                raise FirstLayerError(f"{path} is truncated: download the checkpoint again")
        if not data:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])

    def tensor(self, name: str) -> Tensor:
        shape = self.shape(name)
        if not shape:  # a scalar
            return self.rows_of_scalar(name)
        return self.rows(name, 0, shape[0])

    def rows_of_scalar(self, name: str) -> Tensor:
        path, dtype, _, offset = self.entries[name]
        with open(path, "rb") as file:
            file.seek(offset)
            data = bytearray(file.read(dtype.itemsize))
        return torch.frombuffer(data, dtype=dtype).reshape(())

    def row_blocks(self, name: str, max_bytes: int) -> Iterator[Tensor]:
        """A tensor as consecutive blocks of whole rows, each at most about `max_bytes`."""
        shape = self.shape(name)
        if len(shape) < 2:
            yield self.tensor(name)
            return
        row_bytes = math.prod(shape[1:]) * self.dtype(name).itemsize
        step = max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, shape[0], step):
            yield self.rows(name, start, min(start + step, shape[0]))


DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def read_header(path: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]]:
    """name -> (file, dtype, shape, absolute byte offset) from a safetensors file's header."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise FirstLayerError(f"{path} is truncated: download the checkpoint again")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise FirstLayerError(f"{path} is corrupted or truncated: download it again")
        try:
            header = json.loads(file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FirstLayerError(f"{path} has a corrupted header ({error})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        if base + stop > size:
            raise FirstLayerError(
                f"{path} is truncated: {name} ends at byte {base + stop:,}, the file has "
                f"{size:,}; download the checkpoint again"
            )
        if info["dtype"] not in DTYPES_BY_NAME:
            raise FirstLayerError(f"{path}: {name} has dtype {info['dtype']}, not supported")
        entries[name] = (path, DTYPES_BY_NAME[info["dtype"]], tuple(info["shape"]), base + start)
    return entries


class MappedFile:
    """A file tensors are memory-mapped from. Reading a page past a truncated end kills the
    process (SIGBUS), and a file rewritten in place reads as other numbers, so every model call
    first compares the mapped file (through a descriptor of its own: the same inode, wherever
    the path now points) with its size and modification time when mapped: one fstat, ~1 us.
    A file removed or renamed over is harmless: the mapping keeps the inode it loaded."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self.fd)
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns

    def check(self) -> None:
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns):
            raise FirstLayerError(
                f"{self.path} was truncated or rewritten after the model was loaded, and its "
                "table is read from that file (memory-mapped): load the model again "
                "(`firstlayer check` the folder first)"
            )

    def __deepcopy__(self, memo: dict) -> MappedFile:
        return self  # one descriptor, closed once, by the last model holding it

    def __del__(self) -> None:
        os.close(self.fd)


def map_tensor(path: Path, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> Tensor:
    """A tensor stored at `offset` of a file, memory-mapped: pages become resident only when
    read. The file is opened read-only and mapped copy-on-write, so nothing can write to it (a
    write in this process would go to a private copy of the page)."""
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    count = math.prod(shape)
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).view(shape)
