"""Where a conversion reads the source's weights: a loaded model, or a safetensors checkpoint that
is never loaded (out of core).

Out of core, the model is built from config.json on the meta device (no memory); layer 0's
token-local modules are the only ones given real weights, read from the checkpoint; the embedding
is read a chunk of rows at a time as the table is built; every other tensor is copied to the
output a block of rows at a time. Peak memory is layer 0's token-local weights (in float32) plus
a few chunk buffers, whatever the depth, and the folder written is the one a loaded model gives,
byte for byte.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.analysis.sources import MLX_METHOD, config_quantization
from firstlayer.conversion.mlx_names import mlx_module_paths
from firstlayer.conversion.quantized import (
    FUSED,
    dequantize,
    input_quantization,
    quantize_inputs,
    quantized_modules,
    refuse_unknown,
    scaled_product,
)
from firstlayer.errors import FirstLayerError
from firstlayer.families import family_config, family_of
from firstlayer.hf.adapters import LoraDeltas
from firstlayer.hf.models import auto_model, weight_conversions
from firstlayer.hf.patch import parts_of
from firstlayer.safetensors_io import SafetensorsFolder

# Bytes of a tensor copied (or hashed) per block of rows: enough to stream at disk speed, small
# beside any model worth converting out of core.
COPY_BLOCK_BYTES = 16 * 2**20


def tensor_bytes(tensor: Tensor) -> Any:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def tensor_sha256(tensor: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(memoryview(tensor_bytes(tensor)))
    return digest.hexdigest()


def fingerprint(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], str]]) -> str:
    """sha256 over (name, dtype, shape, sha256 of the bytes) of every weight, in name order:
    identifies a source model, and can be computed one tensor at a time in any order."""
    digest = hashlib.sha256()
    for name, dtype, shape, data_sha256 in sorted(entries):
        digest.update(f"{name}:{dtype}:{shape}:{data_sha256};".encode())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """The fingerprint of a loaded model's state dict (tied weights under each of their names)."""
    return fingerprint(
        (name, t.dtype, tuple(t.shape), tensor_sha256(t)) for name, t in model.state_dict().items()
    )


def rows_at(weight: Any, ids: Tensor) -> Tensor:
    """Rows `ids` of a weight that may only be read in ranges (one from disk)."""
    return torch.cat([weight[i : i + 1] for i in ids.tolist()])


@dataclasses.dataclass
class Weights:
    """A conversion's source: the model the config describes (on the meta device but for layer
    0's token-local modules, out of core) and where its weights come from."""

    model: nn.Module
    embedding_weight: Any  # (V, D) rows by index, in the model's dtype
    blocks: Callable[[str, Tensor], Iterator[Tensor]]  # a kept weight, as blocks of rows
    fingerprint: str | Callable[[], str]  # a callable when known only after the stream
    tokenizer: Any | None = None
    checkpoint: Checkpoint | None = None  # a quantized checkpoint's (its quantized Linears)
    folder: Path | None = None  # the source folder, whose processor files the output copies

    def embedding_rows(self, ids: Tensor) -> Tensor:
        return rows_at(self.embedding_weight, ids)

    def as_stored(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """Kept weights as the checkpoint stores them (`stored_view`)."""
        return weights if self.checkpoint is None else stored_view(weights, self.checkpoint)

    def verbatim(self, name: str) -> bool:
        """Whether a kept tensor is a quantized Linear's part, never cast."""
        quantized = {} if self.checkpoint is None else self.checkpoint.quantized
        return name in quantized.get(name.rpartition(".")[0], ())


def loaded_weights(model: nn.Module, tokenizer: Any | None = None) -> Weights:
    """A loaded model as a conversion's source."""
    return Weights(
        model=model,
        embedding_weight=model.get_input_embeddings().weight,
        blocks=lambda name, tensor: iter((tensor,)),
        # Hashed when a folder needs it (its files carry it), never for a model in memory.
        fingerprint=lambda: weights_fingerprint(model),
        tokenizer=tokenizer,
    )


def row_range(ids: Tensor | slice) -> tuple[int, int]:
    """(start, stop) of a range of rows asked for by a slice or by consecutive ids."""
    if isinstance(ids, slice):
        return ids.start, ids.stop
    start, stop = int(ids[0]), int(ids[-1]) + 1
    assert stop - start == len(ids), "rows are read in ranges"
    return start, stop


class CheckpointRows:
    """The embedding's rows as the loaded model would hold them (its dtype), read from disk.

    Rows must be asked for in ranges (table chunks); the sha256 of the whole weight is taken on
    the way when the first pass reads it front to back, as every conversion's first block does.
    """

    def __init__(self, folder: SafetensorsFolder, name: str, dtype: torch.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.shape = folder.shape(name)
        self.device = torch.device("cpu")
        self._digest, self._next_row = hashlib.sha256(), 0

    def __getitem__(self, ids: Tensor | slice) -> Tensor:
        start, stop = row_range(ids)
        rows = self.folder.rows(self.name, start, stop).to(self.dtype)
        if start == self._next_row:
            self._digest.update(memoryview(tensor_bytes(rows)))
            self._next_row = stop
        return rows

    def sha256(self) -> str:
        if self._next_row != self.shape[0]:  # not read front to back: one pass of its own
            digest = hashlib.sha256()
            for rows in self.folder.row_blocks(self.name, COPY_BLOCK_BYTES):
                digest.update(memoryview(tensor_bytes(rows.to(self.dtype))))
            return digest.hexdigest()
        return self._digest.hexdigest()


def checkpoint_weights(
    source: Path,
    tokenizer: Any | None = None,
    deltas: LoraDeltas | None = None,
    quantized_for: str = "vllm",
) -> Weights:
    """A safetensors folder (sharded or not) as a conversion's source, never loaded.

    Raises FirstLayerError when the checkpoint lacks a tensor the config's model needs (layer 0
    included) or holds one of another shape (`checkpoint_names`), and NeedsLoading for one whose
    weights transformers combines on loading.
    """
    checkpoint = meta_model(source, deltas)
    model, folder, names = checkpoint.model, checkpoint.folder, checkpoint.names
    parts, _ = parts_of(model)
    model_dtype = model.get_submodule(parts.embedding).weight.dtype
    digests: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {}
    for module_name in token_local_modules(model):
        materialize(checkpoint, module_name)
    quantize_layer0_inputs(checkpoint, quantized_for)
    for name, tensor in fingerprint_names(checkpoint).items():  # layer 0's, read whole
        if names.get(name) in checkpoint.read:
            read = checkpoint.read[names[name]].to(tensor.dtype)  # as the model holds it
            digests[name] = (read.dtype, tuple(read.shape), tensor_sha256(read))
    embedding = embedding_rows(checkpoint, parts.embedding, model_dtype)

    def blocks(name: str, tensor: Tensor) -> Iterator[Tensor]:
        digest = hashlib.sha256()
        for rows in folder.row_blocks(names[name], COPY_BLOCK_BYTES):
            rows = rows.to(tensor.dtype)
            digest.update(memoryview(tensor_bytes(rows)))
            yield rows
        digests[name] = (tensor.dtype, tuple(tensor.shape), digest.hexdigest())

    def source_fingerprint() -> str:
        # Every weight of the state dict (a quantized Linear's as its stored tensors): copied,
        # eliminated, or the embedding (also under the name of an LM head tied to it).
        embedding_sha256 = None
        stored_digests: dict[str, str] = {}  # once per stored tensor, a tied LM head's too
        entries = []
        for name, tensor in fingerprint_names(checkpoint).items():
            if name not in digests and names[name] == embedding.name:
                embedding_sha256 = embedding_sha256 or embedding.sha256()
                digests[name] = (tensor.dtype, tuple(tensor.shape), embedding_sha256)
            elif name not in digests:  # a quantized embedding's stored tensors
                stored = names[name]
                if stored not in stored_digests:
                    stored_digests[stored] = stored_sha256(folder, stored)
                digests[name] = (tensor.dtype, tuple(tensor.shape), stored_digests[stored])
            entries.append((name, *digests[name]))
        return fingerprint(entries)

    quantized = checkpoint if checkpoint.quantization is not None else None
    return Weights(model, embedding, blocks, source_fingerprint, tokenizer, quantized, source)


def stored_sha256(folder: SafetensorsFolder, name: str) -> str:
    digest = hashlib.sha256()
    for rows in folder.row_blocks(name, COPY_BLOCK_BYTES):
        digest.update(memoryview(tensor_bytes(rows)))
    return digest.hexdigest()


def embedding_rows(checkpoint: Checkpoint, module: str, dtype: torch.dtype) -> CheckpointRows:
    """The embedding's rows in the model's dtype, read from disk; a quantized one's (mlx-lm
    quantizes embeddings too) dequantized as its method does."""
    if module in checkpoint.quantized:
        return QuantizedRows(checkpoint, module, dtype)
    return CheckpointRows(checkpoint.folder, checkpoint.names[f"{module}.weight"], dtype)


class QuantizedRows(CheckpointRows):
    """A quantized embedding's rows, dequantized a range at a time (exact in its dtype). The
    source's fingerprint takes its stored tensors as stored, like any other quantized module's."""

    def __init__(self, checkpoint: Checkpoint, module: str, dtype: torch.dtype):
        self.parts = {
            name.removeprefix(f"{module}."): checkpoint.names[name]
            for name in checkpoint.quantized[module]
        }
        super().__init__(checkpoint.folder, self.parts["weight"], dtype)
        self.checkpoint, self.module = checkpoint, module
        self.name = f"{module} (dequantized)"  # no stored tensor's: none is fingerprinted as it
        self.shape = tuple(checkpoint.model.get_submodule(module).weight.shape)

    def __getitem__(self, ids: Tensor | slice) -> Tensor:
        start, stop = row_range(ids)
        tensors = {part: self.folder.rows(name, start, stop) for part, name in self.parts.items()}
        shape = (stop - start, self.shape[1])
        return dequantize(self.checkpoint.quantization, self.module, tensors, shape).to(self.dtype)


def fingerprint_names(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """The state dict's tensors as the checkpoint stores them."""
    return stored_view(checkpoint.model.state_dict(), checkpoint)


def stored_view(weights: dict[str, Tensor], checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Weights by state-dict name, a quantized Linear's `weight` replaced by its stored tensors
    (packed codes, scales, zero points), in order."""
    if not checkpoint.quantized:
        return weights
    stored = {}
    for name, tensor in weights.items():
        module = checkpoint.quantized_weight(name)
        if module is not None:
            stored.update(checkpoint.quantized[module])
        else:
            stored[name] = tensor
    return stored


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's model on the meta device and where each of its tensors is stored."""

    model: nn.Module
    folder: SafetensorsFolder
    names: dict[str, str]  # state-dict name (or a quantized Linear's part) -> checkpoint tensor
    # A quantized checkpoint's: per quantized Linear, its stored tensors by name (meta tensors
    # of their stored dtypes and shapes), and the quantization_config.
    quantized: dict[str, dict[str, Tensor]] = dataclasses.field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    read: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # tensors materialized
    inputs_quantized: list[str] = dataclasses.field(default_factory=list)  # layer 0's Linears
    # whose inputs the scheme quantizes, and the engine whose arithmetic their rows follow
    # (`quantize_layer0_inputs`)
    quantized_for: str = "vllm"
    # An mlx-lm folder's: each module's path in mlx-lm's model (its weights' stored names).
    mlx_paths: dict[str, str] = dataclasses.field(default_factory=dict)

    def quantized_weight(self, name: str) -> str | None:
        """The quantized Linear whose `weight` a state-dict name is; None for any other."""
        module = name.removesuffix(".weight")
        return module if name != module and module in self.quantized else None

    def quantized_in(self, module: str) -> list[str]:
        """The quantized Linears in a module (or the module itself)."""
        return [m for m in self.quantized if f"{m}.".startswith(f"{module}.")]

    def dequantized(self, module: str, shape: tuple[int, int]) -> Tensor:
        """A quantized Linear's weight, in float32."""
        parts = {
            name.removeprefix(f"{module}."): self.read_tensor(self.names[name])
            for name in self.quantized[module]
        }
        return dequantize(self.quantization, module, parts, shape)

    def read_tensor(self, stored: str) -> Tensor:
        if stored not in self.read:
            self.read[stored] = self.folder.tensor(stored)
        return self.read[stored]


def meta_model(source: Path, deltas: LoraDeltas | None = None) -> Checkpoint:
    """The config's model on the meta device, the checkpoint (read with adapters merged, where
    `deltas` are given), and for every state-dict name the checkpoint tensor holding it (a tied
    weight may be stored under its partner's name)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    family_of(family_config(config)["model_type"])  # refuses an unsupported family first
    quantization = quantization_dict(config)
    if quantization is not None:
        refuse_unknown(quantization, str(source))
        if deltas is not None:
            raise FirstLayerError(
                f"{source} is quantized: adapters are not merged into a quantized checkpoint; "
                "convert without --adapter and load the adapters onto the converted folder"
            )
    folder = SafetensorsFolder(source) if deltas is None else AdaptedCheckpoint(source, deltas)
    stored = next(
        (folder.dtype(n) for n in folder.names() if is_plain_float(folder.dtype(n))),
        torch.float32,
    )
    # mlx_lm.convert casts the weights (`--dtype`, or to float16) and leaves config.json's dtype
    # as it was; mlx-lm runs the stored one, so the model's dtype is that.
    mlx = quantization is not None and quantization["quant_method"] == MLX_METHOD
    dtype = stored if mlx else config.dtype or stored
    with torch.device("meta"):
        model = auto_model(config.model_type).from_config(config, dtype=dtype)
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    names, quantized, mlx_paths = checkpoint_names(model, folder, source, quantization)
    if deltas is not None:
        folder.adapt(names, model)
    return Checkpoint(model.eval(), folder, names, quantized, quantization, mlx_paths=mlx_paths)


def quantization_dict(config: Any) -> dict[str, Any] | None:
    """A config's quantization as conversion reads it (`config_quantization`: mlx-lm's own as
    method "mlx", else quantization_config as config.json holds it); None for none or GGUF's."""
    quantization = config_quantization(
        {
            "quantization": getattr(config, "quantization", None),
            "quantization_config": getattr(config, "quantization_config", None),
        }
    )
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return None if quantization.get("quant_method") == "gguf" else dict(quantization)


def is_plain_float(dtype: torch.dtype) -> bool:
    """A float dtype a model computes in (not FP8 storage)."""
    return dtype.is_floating_point and dtype.itemsize > 1


class AdaptedCheckpoint(SafetensorsFolder):
    """A checkpoint read as if adapters were merged into it: each range of rows of an adapted
    weight gains its change, in float32, then rounded to the stored dtype (as PEFT's merge adds
    into a loaded model's weight)."""

    def __init__(self, folder: Path, deltas: LoraDeltas):
        super().__init__(folder)
        self.deltas = deltas
        self.adapted: dict[str, str] = {}  # checkpoint tensor -> the parameter an adapter changes

    def adapt(self, names: dict[str, str], model: nn.Module) -> None:
        """Where each adapted parameter is stored, refusing an adapter of what the model lacks."""
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for name, terms in self.deltas.factors.items():
            if name not in names:
                raise FirstLayerError(
                    f"an adapter changes {name}, which this checkpoint's model has not: pass the "
                    "adapters trained on this model"
                )
            for a, b, _ in terms:
                if (b.shape[0], a.shape[1]) != shapes[name]:
                    raise FirstLayerError(
                        f"an adapter's change to {name} is {[b.shape[0], a.shape[1]]}, the "
                        f"weight is {list(shapes[name])}: pass the adapters trained on this model"
                    )
            self.adapted[names[name]] = name

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        rows = super().rows(name, start, stop)
        if name not in self.adapted:
            return rows
        return self.deltas.merged_rows(self.adapted[name], rows, start)


class NeedsLoading(FirstLayerError):
    """transformers builds some weights from several checkpoint tensors (Mixtral's experts
    fused into one): only a loaded model has them."""


def checkpoint_names(
    model: nn.Module,
    folder: SafetensorsFolder,
    source: Path,
    quantization: dict[str, Any] | None = None,
) -> tuple[dict[str, str], dict[str, dict[str, Tensor]], dict[str, str]]:
    """For every state-dict name, the checkpoint tensor that holds it, renamed by transformers'
    own loading rules (`embed_out.` -> `lm_head.`, `LayerNorm.gamma` -> `.weight`, ...) or, in a
    folder mlx-lm wrote, from mlx-lm's module paths (the third map, module -> its path); and for
    a quantized checkpoint, each quantized module's stored tensors (their names join the first
    map)."""
    from transformers.core_model_loading import WeightRenaming

    transforms = weight_conversions(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) != len(transforms):
        if quantization is not None:
            raise FirstLayerError(
                f"{source}: transformers combines this quantized checkpoint's tensors into the "
                "model's weights when it loads them (experts fused into one): quantized "
                "checkpoints of this layout are not converted yet; convert the unquantized release"
            )
        raise NeedsLoading(
            f"{source}: transformers combines checkpoint tensors into this model's weights "
            "when it loads them; convert it from the loaded model"
        )
    state = model.state_dict(keep_vars=True)
    mlx_paths = {}
    if quantization is not None and quantization["quant_method"] == MLX_METHOD:
        mlx_paths = mlx_module_paths(model.config.to_dict(), list(state))
    from_mlx = {path: module for module, path in mlx_paths.items()}
    stored_as = {}
    for stored in folder.names():
        module, _, leaf = stored.rpartition(".")
        if module in from_mlx:  # mlx-lm's name: the state dict's already
            stored_as[f"{from_mlx[module]}.{leaf}"] = stored
            continue
        name = stored
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        stored_as[name] = stored
    quantized: dict[str, dict[str, Tensor]] = {}
    names = {}
    if quantization is not None:
        dtypes = {name: folder.dtype(stored) for name, stored in stored_as.items()}
        for module, parts in quantized_modules(quantization["quant_method"], state, dtypes).items():
            quantized[module] = {}
            for name in parts.values():
                stored = stored_as[name]
                meta = torch.empty(folder.shape(stored), dtype=folder.dtype(stored), device="meta")
                quantized[module][name] = meta
                names[name] = stored
        # A weight tied to a quantized one (an LM head to a quantized embedding) is stored as it.
        for name, parameter in model.named_parameters(remove_duplicate=False):
            module = name.removesuffix(".weight")
            tied = next((m for m in quantized if state[f"{m}.weight"] is parameter), None)
            if name.endswith(".weight") and module not in quantized and tied is not None:
                quantized[module] = quantized[tied]
        if not quantized:
            raise FirstLayerError(
                f"{source}: config.json declares {quantization['quant_method']} quantization, "
                "but no Linear is stored quantized (no packed weights or scales): the weights "
                "and the config disagree; use the config.json that came with these weights"
            )
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    for name, tensor in state.items():
        if name.endswith(".weight") and name.removesuffix(".weight") in quantized:
            continue
        stored = next(
            (stored_as[n] for n in aliases.get(id(tensor), [name]) if n in stored_as), None
        )
        if stored is None:
            raise FirstLayerError(
                f"{source} holds no tensor {name!r}, which its config.json's model needs "
                "(a checkpoint of another layout, or one cut short): convert from a complete "
                "checkpoint, or load it with transformers and use `firstlayer.convert`"
            )
        if folder.shape(stored) != tuple(tensor.shape):
            raise FirstLayerError(
                f"{source}: {stored} is {list(folder.shape(stored))}, but config.json makes it "
                f"{list(tensor.shape)}: the weights and the config disagree; use the "
                "config.json that came with these weights"
            )
        if tensor.is_floating_point() and not is_plain_float(folder.dtype(stored)):
            raise FirstLayerError(
                f"{source}: {stored} is stored as {folder.dtype(stored)} without the scales of "
                "a quantized weight its quantization_config describes: the weights and the "
                "config disagree; use the config.json that came with these weights"
            )
        names[name] = stored
    return names, quantized, mlx_paths


def token_local_modules(model: nn.Module, record: dict | None = None) -> list[str]:
    """Layer 0's modules the table is computed from, as a conversion computes it now or as
    `record`'s folder was computed (`hf.patch.parts_of`), and the q/k norms a run of layer 0
    passes through on the way to its last projection: the modules materialized."""
    parts, parallel = parts_of(model, record)
    return [*parts.token_local(parallel), *parts.run_head_norms.values()]


def materialize(checkpoint: Checkpoint, module_name: str) -> None:
    """Give one meta module its weights from the checkpoint, in the model's dtypes; a module
    holding a quantized Linear in float32, its weight dequantized (exact in float32)."""
    module = checkpoint.model.get_submodule(module_name)
    if checkpoint.quantized_in(module_name):
        module.to(torch.float32)
    tensors = {}
    for local, tensor in module.state_dict(keep_vars=True).items():
        name = f"{module_name}.{local}"
        quantized = checkpoint.quantized_weight(name)
        if quantized is not None:
            tensors[local] = checkpoint.dequantized(quantized, tuple(tensor.shape))
        else:
            tensors[local] = checkpoint.read_tensor(checkpoint.names[name]).to(tensor.dtype)
    module.to_empty(device="cpu")
    module.load_state_dict(tensors, strict=True)


def quantize_layer0_inputs(checkpoint: Checkpoint, engine: str = "vllm") -> None:
    """Where the scheme quantizes layer 0's Linears' inputs (W8A8, FP8), make the materialized
    layer 0 compute as the quantized model does: the norms feeding those Linears in the model's
    dtype (normalized in float32, rounded, times the gain in the model's dtype, as transformers
    and vLLM run them), then each input quantized per token as `engine` does
    (`quantized.InputQuantization`). The table and the self-check's reference both run these
    modules."""
    model = checkpoint.model
    parts, parallel = parts_of(model)
    dtype = model.get_submodule(parts.embedding).weight.dtype
    checkpoint.quantized_for = engine
    for name in token_local_modules(model):
        for module in checkpoint.quantized_in(name):
            scale = stored_input_scale(checkpoint, module)
            if input_quantization(checkpoint.quantization, module, scale) is None:
                continue  # weights only
            checkpoint.inputs_quantized.append(module)
            if engine == "vllm" and scale is not None:
                # vLLM fuses q/k/v (gate/up) into one Linear, whose input it quantizes by the
                # largest of their stored scales.
                scales = [stored_input_scale(checkpoint, m) for m in fused_with(checkpoint, module)]
                scale = max((s for s in scales if s is not None), key=lambda s: s.float().max())
            quantization = input_quantization(checkpoint.quantization, module, scale, engine)
            stored = {
                n.removeprefix(f"{module}."): checkpoint.read_tensor(checkpoint.names[n])
                for n in checkpoint.quantized[module]
            }
            product = scaled_product(checkpoint.quantization, module, quantization, stored)
            quantize_inputs(model.get_submodule(module), quantization, dtype, product)
    if checkpoint.inputs_quantized:
        norms = (parts.attn_norm, parts.mlp_norm if parallel else None)
        for norm in filter(None, norms):
            run_in_dtype(model.get_submodule(norm), dtype)


def stored_input_scale(checkpoint: Checkpoint, module: str) -> Tensor | None:
    """A quantized Linear's stored (static) input scale; None for a dynamic or weight-only one."""
    names = checkpoint.quantized[module]
    stored = (n for n in names if n.endswith((".input_scale", ".activation_scale")))
    return next((checkpoint.read_tensor(checkpoint.names[n]) for n in stored), None)


def fused_with(checkpoint: Checkpoint, module: str) -> list[str]:
    """The quantized Linears vLLM fuses with `module` into one (itself included)."""
    parent, _, part = module.rpartition(".")
    siblings = [f"{parent}.{p}" for p, fused in FUSED.items() if fused == FUSED.get(part)]
    return [m for m in checkpoint.quantized if m == module or m in siblings]


def run_in_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Make a module give what a copy of it in `dtype` gives (a forward hook, which the float32
    copies the table is built with keep)."""
    in_dtype = copy.deepcopy(module).to(dtype)

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return in_dtype(args[0].to(dtype)).to(output.dtype)

    module.register_forward_hook(hook)
