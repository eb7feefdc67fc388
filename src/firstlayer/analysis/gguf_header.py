"""A GGUF file's header (metadata and tensor shapes) read with struct alone: no numpy, no gguf.

The format is https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. gguf.GGUFReader unpacks
every metadata array with numpy (SmolLM2's 49k tokens and 49k merges: about two seconds); this
reader steps over big arrays and keeps only their lengths.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from firstlayer.errors import FirstLayerError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp writes 3
MAX_LISTED = 1024  # arrays up to this long (per-layer head counts) are kept as lists
MAX_NESTING = 8  # arrays of arrays are legal but unused; a deeper chain is a corrupt file
DEFAULT_ALIGNMENT = 32  # tensor data starts at a multiple of general.alignment, 32 by default
CHUNK_BYTES = 1 << 20  # one read covers most headers; the tokenizer arrays take a few

STRING, ARRAY = 8, 9
# GGUF value type -> struct code of one little-endian element.
# fmt: off
SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                10: "Q", 11: "q", 12: "d"}
# fmt: on
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
# The fewest bytes an array element can take: a string's length, an inner array's type and count.
MIN_BYTES = {STRING: 8, ARRAY: 12} | {t: struct.calcsize(c) for t, c in SCALAR_CODES.items()}


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before its tensor data; arrays past MAX_LISTED only by length."""

    version: int
    metadata: dict[str, Any]  # key -> str, int, float, bool, or a list (arrays of <= MAX_LISTED)
    array_lengths: dict[str, int]  # every array-valued key -> its length (outer, if nested)
    tensors: dict[str, tuple[int, ...]]  # name -> dims innermost first (ne[0], ...), as in ggml
    tensor_types: dict[str, int]  # name -> ggml type (0 F32, 1 F16, 3 Q4_1, ...)
    tensor_offsets: dict[str, int]  # name -> offset of its data from `data_start`
    data_start: int  # where tensor data begins: the header's end, aligned
    file_size: int


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """A .gguf file's header; one that is not GGUF, or is cut short, raises FirstLayerError."""
    try:
        with open(path, "rb") as file:
            return _parse(_Cursor(file, os.fstat(file.fileno()).st_size, str(path)))
    except OSError as error:
        raise FirstLayerError(f"{path}: cannot read it ({error.strerror or error})") from None


def _parse(cur: _Cursor) -> GGUFHeader:
    magic = cur.take(min(4, cur.size), "the magic")
    if magic != MAGIC:
        raise cur.error(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r}): pass a .gguf file")
    version = cur.unpack(U32, "the version")
    if version & 0xFFFF == 0:  # a version of 2 or 3 read in the wrong byte order
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise cur.error(
            f"a big-endian GGUF file (version {swapped}), and only little-endian files are read: "
            "convert it with gguf-py's gguf_convert_endian"
        )
    if version not in SUPPORTED_VERSIONS:
        raise cur.error(
            f"GGUF version {version} is not supported (only 2 and 3): convert it again with a "
            "current llama.cpp"
        )
    tensor_count = cur.count(24, "the tensor count")  # name length, n_dims, type, offset
    kv_count = cur.count(13, "the metadata count")  # key length, value type, one byte
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = cur.string("a metadata key")
        if key in metadata or key in array_lengths:
            raise cur.error(f"metadata key {key!r} appears twice: the file is corrupt")
        kind = cur.unpack(U32, f"the type of {key!r}")
        if kind == ARRAY:
            value, array_lengths[key] = _array(cur, key)
            if value is not None:
                metadata[key] = value
        else:
            metadata[key] = _value(cur, kind, key)
    tensors: dict[str, tuple[int, ...]] = {}
    types: dict[str, int] = {}
    offsets: dict[str, int] = {}
    for _ in range(tensor_count):
        name = cur.string("a tensor name")
        if name in tensors:
            raise cur.error(f"tensor {name!r} appears twice: the file is corrupt")
        n_dims = cur.count(8, f"the dimension count of tensor {name!r}", U32)
        tensors[name] = cur.unpack_many("Q", n_dims, f"the dimensions of tensor {name!r}")
        types[name] = cur.unpack(U32, f"the type of tensor {name!r}")
        offsets[name] = cur.unpack(U64, f"the data offset of tensor {name!r}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise cur.error(f"general.alignment is {alignment!r}: the file is corrupt")
    end = cur.offset + cur.pos
    data_start = end + (-end % alignment)
    return GGUFHeader(
        version, metadata, array_lengths, tensors, types, offsets, data_start, cur.size
    )


def _value(cur: _Cursor, kind: int, key: str) -> Any:
    if kind == STRING:
        return cur.string(f"the value of {key!r}")
    if kind not in SCALAR_CODES:
        raise cur.error(f"{key!r} has unknown value type {kind}: the file is corrupt or too new")
    return cur.unpack_many(SCALAR_CODES[kind], 1, f"the value of {key!r}")[0]


def _array(cur: _Cursor, key: str, depth: int = 0) -> tuple[list[Any] | None, int]:
    """(the elements, or None past MAX_LISTED or for nested arrays; the element count)."""
    if depth > MAX_NESTING:
        raise cur.error(f"{key!r} nests arrays over {MAX_NESTING} deep: the file is corrupt")
    kind = cur.unpack(U32, f"the element type of {key!r}")
    if kind not in MIN_BYTES:
        raise cur.error(f"{key!r} has unknown element type {kind}: the file is corrupt or too new")
    what = f"the elements of {key!r}"
    count = cur.count(MIN_BYTES[kind], f"the length of {key!r}")
    if kind == ARRAY:  # nested arrays: nothing here reads them, so step over each
        for i in range(count):
            _array(cur, f"{key}[{i}]", depth + 1)
        return None, count
    if count <= MAX_LISTED:
        if kind == STRING:
            return [cur.string(what) for _ in range(count)], count
        return list(cur.unpack_many(SCALAR_CODES[kind], count, what)), count
    if kind == STRING:
        cur.skip_strings(count, what)
    else:
        cur.skip(count * MIN_BYTES[kind], what)
    return None, count


class _Cursor:
    """Buffered little-endian reads from a file, each checked against the file's size first."""

    def __init__(self, file: BinaryIO, size: int, name: str) -> None:
        self.file, self.size, self.name = file, size, name
        self.buf = b""
        self.pos = 0  # in buf
        self.offset = 0  # of buf[0] in the file

    def error(self, problem: str) -> FirstLayerError:
        return FirstLayerError(f"{self.name}: {problem}")

    def truncated(self, what: str, n: int) -> FirstLayerError:
        at = self.offset + self.pos
        return self.error(
            f"truncated GGUF header: {what} needs {n} bytes from offset {at}, but the file ends at "
            f"{self.size}: the file is incomplete, so download or convert it again"
        )

    def need(self, n: int, what: str) -> None:
        """Make n bytes available at pos; n is checked against the file before any read."""
        if self.pos + n <= len(self.buf):
            return
        at = self.offset + self.pos
        if at + n > self.size:
            raise self.truncated(what, n)
        self.file.seek(at)
        self.buf, self.pos, self.offset = self.file.read(max(n, CHUNK_BYTES)), 0, at
        if len(self.buf) < n:  # the file shrank since its size was taken
            raise self.truncated(what, n)

    def skip(self, n: int, what: str) -> None:
        if self.offset + self.pos + n > self.size:
            raise self.truncated(what, n)
        if self.pos + n <= len(self.buf):
            self.pos += n
        else:  # past the buffer: the next need() seeks there
            self.buf, self.pos, self.offset = b"", 0, self.offset + self.pos + n

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def unpack_many(self, code: str, count: int, what: str) -> tuple[Any, ...]:
        fmt = struct.Struct(f"<{count}{code}")
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def count(self, min_bytes: int, what: str, fmt: struct.Struct = U64) -> int:
        """A count of items of at least min_bytes each; one the file cannot hold is refused here."""
        n = self.unpack(fmt, what)
        if n * min_bytes > self.size - (self.offset + self.pos):
            raise self.truncated(f"{what} ({n}, at least {min_bytes} bytes each)", n * min_bytes)
        return n

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)  # n is bounded by the file's size, so no huge allocation
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw

    def string(self, what: str) -> str:
        n = self.unpack(U64, what)
        at = self.offset + self.pos
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at offset {at} is not UTF-8: the file is corrupt") from None

    def skip_strings(self, count: int, what: str) -> None:
        # The hot loop (a vocabulary and its merges): stay on the buffer while whole strings fit.
        unpack_from, left = U64.unpack_from, count
        while left:
            buf, pos, end = self.buf, self.pos, len(self.buf)
            while left and pos + 8 <= end:
                (n,) = unpack_from(buf, pos)
                if pos + 8 + n > end:
                    break
                pos += 8 + n
                left -= 1
            self.pos = pos
            if left:  # a string runs past the buffer: the checked path refills or raises
                self.skip(self.unpack(U64, what), what)
                left -= 1
