"""gguf_header: the struct-only reader agrees with gguf.GGUFReader and refuses broken files."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from firstlayer.analysis.gguf_header import MAX_LISTED, read_gguf_header
from firstlayer.analysis.sources import default_gguf_path
from firstlayer.errors import FirstLayerError


def reader_view(path: Path) -> tuple[dict[str, Any], dict[str, int], dict[str, tuple[int, ...]]]:
    """GGUFReader's answer in GGUFHeader's form: (metadata, array_lengths, tensors)."""
    reader = gguf.GGUFReader(path)
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}

    def one(field: Any, index: int) -> Any:
        part = field.parts[index]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for version and counts
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            lengths[key] = len(field.data)
            if len(field.data) <= MAX_LISTED:
                metadata[key] = [one(field, i) for i in field.data]
        else:
            metadata[key] = one(field, field.data[0])
    tensors = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return metadata, lengths, tensors


def assert_agrees_with_gguf_reader(path: Path) -> None:
    header = read_gguf_header(path)
    metadata, lengths, tensors = reader_view(path)
    assert header.version == 3
    assert header.metadata == metadata
    # == alone takes True for 1 and 1.0 for 1: the Python types must match too.
    assert {k: type(v) for k, v in header.metadata.items()} == {
        k: type(v) for k, v in metadata.items()
    }
    assert header.array_lengths == lengths
    assert header.tensors == tensors
    assert list(header.tensors) == list(tensors)  # file order


def write_every_type(path: Path) -> Path:
    """A tiny GGUF file with a value of every scalar type, small and long arrays, and tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1e-5)  # not exact in float32: both readers widen the same value
    writer.add_bool("t.yes", True)
    writer.add_bool("t.no", False)
    writer.add_string("t.str", "héllo ✓")
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_array("t.heads", [4, 8, 8, 2])  # per-layer values: kept as a list
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.flags", [True, False, True])
    writer.add_array("t.words", ["a", "", "ü"])
    writer.add_token_list([f"tok{i}".encode() for i in range(MAX_LISTED + 500)])  # by length
    writer.add_token_scores([float(i) for i in range(MAX_LISTED + 500)])
    writer.add_array("t.empty", [])
    writer.add_tensor("token_embd.weight", np.zeros((40, 8), np.float32))  # (V, D): ne = (8, 40)
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(8, np.float16))
    writer.add_tensor("blk.0.cube", np.zeros((2, 3, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_reader_agrees_with_gguf_reader_on_smollm2():
    path = default_gguf_path()
    assert_agrees_with_gguf_reader(path)
    header = read_gguf_header(path)
    assert header.array_lengths["tokenizer.ggml.tokens"] == 49152
    assert header.tensors["token_embd.weight"] == (576, 49152)  # innermost first: (D, V)


def test_reader_agrees_with_gguf_reader_on_every_value_type(tmp_path):
    path = write_every_type(tmp_path / "every.gguf")
    assert_agrees_with_gguf_reader(path)
    header = read_gguf_header(path)
    assert header.metadata["t.heads"] == [4, 8, 8, 2]
    assert header.metadata["t.words"] == ["a", "", "ü"]
    assert "tokenizer.ggml.tokens" not in header.metadata
    assert header.array_lengths["tokenizer.ggml.tokens"] == MAX_LISTED + 500
    assert header.tensors["blk.0.cube"] == (4, 3, 2)


def test_nested_arrays_are_stepped_over_and_kept_by_length(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "nested.gguf"), "llama")
    writer.add_array("t.nested", [[1, 2], [3, 4, 5]])
    writer.add_uint32("t.after", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    header = read_gguf_header(tmp_path / "nested.gguf")
    assert (header.array_lengths["t.nested"], header.metadata["t.after"]) == (2, 7)
    assert "t.nested" not in header.metadata


def test_truncated_smollm2_copy_says_truncated(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as file:
        path.write_bytes(file.read(1000))
    with pytest.raises(FirstLayerError, match=rf"{path}: truncated GGUF header: .* ends at 1000"):
        read_gguf_header(path)


def test_every_cut_of_a_header_raises_first_layer_error(tmp_path):
    # No prefix may escape as struct.error, IndexError or UnicodeDecodeError.
    path = write_every_type(tmp_path / "every.gguf")
    last = gguf.GGUFReader(path).tensors[-1].field
    header_bytes = last.offset + sum(part.nbytes for part in last.parts)  # before the padding
    whole, cut = path.read_bytes(), tmp_path / "cut.gguf"
    # Every byte through the scalars and small arrays, then a stride through the long ones.
    for n in [*range(1000), *range(1000, header_bytes, 13), header_bytes - 1]:
        cut.write_bytes(whole[:n])
        with pytest.raises(FirstLayerError, match=f"{cut}: (truncated GGUF header|not a GGUF)"):
            read_gguf_header(cut)
    cut.write_bytes(whole[:header_bytes])
    # The header alone reads the same; only the file's size (its tensor data) differs.
    assert replace(read_gguf_header(cut), file_size=0) == replace(
        read_gguf_header(path), file_size=0
    )


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 a zip file, say", b"{}"])
def test_non_gguf_file_names_the_magic(tmp_path, content):
    path = tmp_path / "other.gguf"
    path.write_bytes(content)
    with pytest.raises(FirstLayerError, match=rf"{path}: not a GGUF file \(magic b'"):
        read_gguf_header(path)


def test_big_endian_and_other_versions_are_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(FirstLayerError, match="big-endian GGUF file .version 3."):
        read_gguf_header(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(FirstLayerError, match="GGUF version 1 is not supported"):
        read_gguf_header(path)


def test_counts_the_file_cannot_hold_are_refused_before_reading(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60))
    with pytest.raises(FirstLayerError, match="truncated GGUF header: the metadata count"):
        read_gguf_header(path)
    one_key = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"big"
    path.write_bytes(one_key + struct.pack("<IIQ", 9, 8, 2**40))  # 2**40 strings
    with pytest.raises(FirstLayerError, match="truncated GGUF header: the length of 'big'"):
        read_gguf_header(path)
    path.write_bytes(one_key + struct.pack("<IQ", 8, 2**62))  # a string of 2**62 bytes
    with pytest.raises(FirstLayerError, match="truncated GGUF header: the value of 'big'"):
        read_gguf_header(path)


def test_bad_utf8_key_is_a_first_layer_error(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2) + b"\xff\xfe" + struct.pack("<I", 4)
    )
    with pytest.raises(FirstLayerError, match="a metadata key at offset 32 is not UTF-8"):
        read_gguf_header(path)
