"""A GGUF file's precomputed twin, for a llama.cpp built with `llama.cpp/0001-token-qkv.patch`:

    token_qkv   (V, q+k+v)   layer 0's q, k, v per token id, in the table's type
    token_embd  (V, D)       x as it was (serial), or x + ffn(x) in the table's type (parallel)
    output      (V, D)       a tied head's plain embedding, written out where token_embd changed

Layer 0's attention norm and q/k/v weights (for a parallel block also its FFN and FFN norm) are
dropped; every other tensor is copied as stored, quantized ones included, and the metadata gains
`firstlayer.*` keys saying what was done. A stock llama.cpp refuses the file (layer 0's tensors
are missing); the patched one reads q, k and v with a get_rows where it ran the projections.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quantize

from firstlayer.analysis.gguf_header import read_gguf_header
from firstlayer.errors import FirstLayerError
from firstlayer.llamacpp.layer0 import EMBEDDING, OUTPUT, TABLE_TENSOR, Layer0, architecture_named

# The table's types: llama.cpp's get_rows reads each (Q8_0: int8 with a float16 scale per 32).
TABLE_TYPES = {name: GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0")}
# The table's type by default: the embedding's where it is one of those, else F16.
DEFAULT_TABLE_TYPE = "F16"
# Rows per chunk: a few MB of float32 work buffers whatever the vocabulary.
GGUF_CHUNK_ROWS = 2048
METADATA_PREFIX = "firstlayer."
# Where tensor data starts, as a multiple of bytes: a cache line. GGUF's default, 32, leaves every
# tensor half a line off whenever the metadata ends at 32 mod 64 (as a table's keys can make it),
# and then each 64-byte load of ggml's CPU kernels spans two lines. A source's larger alignment is
# kept (its key copied without aligning to it would misplace every tensor).
DATA_ALIGNMENT = 64


@dataclass(frozen=True)
class GGUFExport:
    """What `export_gguf` wrote."""

    out: Path
    arch: str  # general.architecture
    table_type: str
    is_parallel: bool
    dropped: tuple[str, ...]  # layer 0's tensors the table replaces
    table_bytes: int  # token_qkv's (and, for a parallel block, the new token_embd's) bytes

    def describe(self) -> str:
        first = "x + ffn(x)" if self.is_parallel else "x"
        return (
            f"{self.arch}, token_qkv in {self.table_type} ({self.table_bytes / 2**20:.1f} MiB), "
            f"token_embd holds {first}; {len(self.dropped)} tensors of layer 0 dropped"
        )


# The project's table dtypes by llama.cpp's names for them (int8 with per-row scales is Q8_0's
# nearest: int8 with a scale per 32 values).
GGUF_TYPE_OF_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "Q8_0"}


def convert_to_gguf(
    source: str,
    out: str | Path,
    table_type: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    dtype: str | None = None,
) -> GGUFExport:
    """`firstlayer convert SOURCE OUT.gguf`: SOURCE a .gguf file, a folder holding one, or
    `default`; or a Hugging Face folder, which llama.cpp's converter writes as GGUF first (its
    weights in `dtype`, default the folder's). `table_type` in llama.cpp's names or the
    project's dtype names."""
    from firstlayer.analysis.sources import resolve_source
    from firstlayer.llamacpp.converter import hf_to_gguf

    resolved = resolve_source(source)
    table_type = GGUF_TYPE_OF_DTYPE.get(table_type, table_type) if table_type else None
    if resolved.kind == "gguf":
        if dtype is not None:
            raise FirstLayerError("--dtype: a GGUF source's weights are kept as stored")
        return export_gguf(resolved.path, out, table_type, force, progress)
    if resolved.kind != "folder":
        raise FirstLayerError(
            f"{source}: a .gguf OUT is written from a GGUF file or a model folder"
        )
    out = Path(out)
    if out.exists() and not force:
        raise FirstLayerError(f"{out} exists: pass --force to replace it")
    original = hf_to_gguf(resolved.path, out.with_name(f".{out.name}.original"), dtype)
    try:
        return export_gguf(original, out, table_type, force, progress)
    finally:
        original.unlink(missing_ok=True)


def table_type_of(name: str | None, reader: GGUFReader) -> str:
    """A table type by name, or by default the embedding's type where the table may take it."""
    if name is None:
        embedding = next(t for t in reader.tensors if t.name == EMBEDDING)
        name = embedding.tensor_type.name
        return name if name in TABLE_TYPES else DEFAULT_TABLE_TYPE
    if name not in TABLE_TYPES:
        raise FirstLayerError(
            f"table type {name!r} is not one llama.cpp reads a table in: use one of "
            f"{', '.join(TABLE_TYPES)}"
        )
    return name


def encoded(rows: np.ndarray, table_type: str) -> np.ndarray:
    """float32 rows (N, W) in the table's type: F32 and F16 as arrays, others as their bytes."""
    if table_type == "F32":
        return rows.astype(np.float32)
    if table_type == "F16":
        return rows.astype(np.float16)
    return quantize(rows, TABLE_TYPES[table_type])


def export_gguf(
    source: str | Path,
    out: str | Path,
    table_type: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Write SOURCE's precomputed twin to OUT (a .gguf file), atomically; see the module's
    docstring. `table_type`: F32, F16, BF16 or Q8_0 (default: the embedding's type where it is
    one of them, else F16). Refuses an existing OUT unless `force`."""
    source, out = Path(source), Path(out)
    if out.exists() and not force:
        raise FirstLayerError(f"{out} exists: pass --force to replace it")
    refuse_unpatched(source)  # from the header alone: gguf-py reads the vocabulary for seconds
    reader = GGUFReader(source)
    layer0 = Layer0(reader)
    table_type = table_type_of(table_type, reader)
    tables = build_tables(layer0, table_type, progress)
    dropped = tuple(layer0.used)
    tensors = {t.name: t for t in reader.tensors}
    # A tied head reads token_embd; where that holds x + ffn(x), the head keeps the plain rows.
    untie = layer0.is_parallel and OUTPUT not in tensors
    tmp = out.with_name(f".{out.name}.tmp")
    writer = GGUFWriter(tmp, layer0.arch_name)
    try:
        writer.add_custom_alignment(max(reader.alignment, DATA_ALIGNMENT))
        copy_metadata(reader, writer)
        record = {
            "version": package_version(),
            "source": source.name,
            "layer0": "q, k, v per token id in token_qkv (attn_norm and q/k/v applied)",
            "token_embd": "x + ffn(x)" if layer0.is_parallel else "x",
            "table_type": table_type,
            "dropped": list(dropped),
            "untied_output": untie,
        }
        for key, value in record.items():
            add_value(writer, METADATA_PREFIX + key, value)
        stream: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []
        for tensor in reader.tensors:
            if tensor.name in dropped:
                continue
            if tensor.name == EMBEDDING:
                if layer0.is_parallel:
                    stream.append((EMBEDDING, tables["residual"], TABLE_TYPES[table_type]))
                else:
                    stream.append((EMBEDDING, tensor.data, tensor.tensor_type))
                stream.append((TABLE_TENSOR, tables["qkv"], TABLE_TYPES[table_type]))
                if untie:
                    stream.append((OUTPUT, tensor.data, tensor.tensor_type))
            else:
                stream.append((tensor.name, tensor.data, tensor.tensor_type))
        for name, data, kind in stream:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in stream:
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    table_bytes = sum(t.nbytes for t in tables.values())
    return GGUFExport(out, layer0.arch_name, table_type, layer0.is_parallel, dropped, table_bytes)


def refuse_unpatched(source: Path) -> None:
    """A file the patch's graphs cannot run, or one precomputed already, refused by its header."""
    header = read_gguf_header(source)
    architecture_named(header.metadata.get("general.architecture"))
    if TABLE_TENSOR in header.tensors:
        raise FirstLayerError(f"{source} is precomputed already (it holds {TABLE_TENSOR})")


def build_tables(
    layer0: Layer0, table_type: str, progress: Callable[[int, int], None] | None = None
) -> dict[str, np.ndarray]:
    """token_qkv's rows (and a parallel block's token_embd) for the whole vocabulary, encoded."""
    parts: dict[str, list[np.ndarray]] = {"qkv": []}
    if layer0.is_parallel:
        parts["residual"] = []
    for start, stop in chunks(layer0.vocab_size):
        x = layer0.embedding_rows(start, stop)  # (N, D)
        parts["qkv"].append(encoded(layer0.qkv(x), table_type))
        if layer0.is_parallel:
            parts["residual"].append(encoded(layer0.residual(x), table_type))
        if progress:
            progress(stop, layer0.vocab_size)
    return {name: np.concatenate(blocks) for name, blocks in parts.items()}


def chunks(vocab_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, vocab_size, GGUF_CHUNK_ROWS):
        yield start, min(start + GGUF_CHUNK_ROWS, vocab_size)


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Every key of the source but the ones the writer writes itself (as gguf-py's own
    gguf_new_metadata copies them) and the alignment, which `export_gguf` sets."""
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.alignment"):
            continue
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)


def add_value(writer: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_string(key, str(value))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("firstlayer")
    except PackageNotFoundError:
        return "unknown"
