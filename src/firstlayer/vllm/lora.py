"""LoRA on a precomputed model in vLLM (`enable_lora=True`), exact.

vLLM's LoRA manager wraps every linear layer it knows; layer 0's q/k/v are rows of the table,
which it does not know, so the plugin builds that layer itself: a subclass of vLLM's own q/k/v
LoRA layer (its per-slot stacks, `set_lora`, tensor-parallel slicing, punica kernels and per-token
slot mapping), whose input is [this rank's q k v rows | norm(x)] and whose output is the rows plus
B·A·norm(x). The manager takes a module that already is a LoRA layer as it is and fills its slots.

    original:     qkv = W·n(x) + B·A·n(x)       (one QKVParallelLinear with LoRA)
    precomputed:  qkv = T[t]   + B·A·n(x)       (n(x) from the norm the table module keeps)

On vLLM's Transformers-backend route the transformers side's patch runs inside vLLM, and layer
0's q/k/v become the LoRA layer vLLM puts on the backend's own projection (its fused q/k/v), fed
the same [rows | norm(x)].
A family's q/k norms run after this layer, on rows + B·A·n(x), as on the original (format 6).

What the table replaced and no layer here applies exactly is refused by name when the adapter is
loaded (`add_lora`, or the worker's load of a request's adapter), and, for a request's adapter,
already in the front end, before the engine sees the request: an adapter the worker refuses
while a step runs would take the engine down with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.hf.adapters import AdapterTargets, adapter_module_names, adapter_targets


@functools.cache
def rows_with_lora_class(packed: int) -> type:
    """Layer 0's q/k/v with LoRA, on vLLM's layer for the family's packing: q, k and v packed
    into one qkv_proj (3), or one fused projection (1)."""
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA

    base = MergedQKVParallelLinearWithLoRA if packed == 3 else QKVParallelLinearWithLoRA

    class RowsWithLoRA(base):
        """[q k v rows | norm(x)] -> (rows + B·A·norm(x), None), for this rank's columns."""

        def __init__(self, projection: nn.Module, rows_width: int):
            super().__init__(projection)
            hide_base_layer(self)
            self.rows_width = rows_width

        def forward(self, rows_and_input: Tensor) -> Tensor | tuple[Tensor, None]:
            sizes = [self.rows_width, rows_and_input.shape[-1] - self.rows_width]
            rows, normed = rows_and_input.split(sizes, dim=-1)
            output = add_lora(self, rows, normed)
            # vLLM's own classes take (output, bias); the Transformers backend's fused q/k/v
            # returns the output alone, which its attention splits by `output_sizes`.
            return (output, None) if self.base_layer.return_bias else output

    return RowsWithLoRA


def hide_base_layer(layer: nn.Module) -> None:
    """The projection a LoRA layer wraps gives shapes and sharding only: hidden from the manager
    (which would wrap a LinearBase) and from the loader, its weight dropped."""
    projection = layer._modules.pop("base_layer")
    projection.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    layer.__dict__["base_layer"] = projection


def add_lora(layer: nn.Module, rows: Tensor, normed: Tensor) -> Tensor:
    """rows + B·A·norm(x) for each token's adapter slot, by vLLM's kernels (a copy of the rows:
    the kernels add in place, and an attention may clamp in place, OLMo's clip_qkv)."""
    output = rows.clone(memory_format=torch.contiguous_format)
    if getattr(layer, "punica_wrapper", None) is None:  # set by the LoRA manager
        return output
    # The kernels take (T, .): the Transformers backend's batch dimension of one goes.
    flat = output.view(-1, output.shape[-1])
    lora_output = layer.punica_wrapper.add_lora_linear(
        flat,
        normed.reshape(-1, normed.shape[-1]).contiguous(),
        layer.lora_a_stacked,
        layer.lora_b_stacked,
        1.0,
        layer.output_slices,
    )
    if lora_output is not None:  # where a platform cannot add in place
        flat = lora_output
    return flat.view(output.shape)


@functools.cache
def columns_with_lora_class(base: type) -> type:
    """Layer 0's one precomputed projection with LoRA on vLLM's Transformers backend route (one
    rank), where the backend did not fuse it with others (a serial GPT-NeoX's query_key_value),
    on `base`, vLLM's own LoRA layer for the backend's projection."""

    class ColumnsWithLoRA(base):
        """[q k v rows | norm(x)] -> its columns of the rows + B·A·norm(x), as `hf.patch.Columns`
        with PEFT's `ColumnsLora`."""

        def __init__(self, projection: nn.Module, start: int, stop: int, rows_width: int):
            super().__init__(projection)
            hide_base_layer(self)
            self.start, self.stop, self.rows_width = start, stop, rows_width

        def forward(self, rows_and_input: Tensor) -> Tensor:
            rows = rows_and_input[..., self.start : self.stop]  # (1, T, width)
            return add_lora(self, rows, rows_and_input[..., self.rows_width :])

    return ColumnsWithLoRA


def backend_lora_layers(model: nn.Module, projections: dict[str, nn.Module], lora_config: Any):
    """On the Transformers backend route: each of layer 0's precomputed projections (`hf.patch.
    Columns`, by name in `model`) becomes the LoRA layer vLLM puts on the backend's projection of
    that name in `projections`, and layer 0's attention receives norm(x) after the rows. The
    backend fuses q, k and v into one QKVParallelLinear where the family's attention code allows
    (vLLM 0.32: every serial family the plugin serves there), whose packed LoRA layer is the one
    vLLM's own classes get (`lora_layer`)."""
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA
    from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear

    for name, projection in projections.items():
        columns = model.get_submodule(name)
        if isinstance(projection, QKVParallelLinear):
            layer = lora_layer(projection, model, name.rpartition(".")[2], lora_config)
            layer.output_sizes = projection.output_sizes  # which the backend's split reads
        else:
            is_column = isinstance(projection, ColumnParallelLinear)
            base = ColumnParallelLinearWithLoRA if is_column else ReplicatedLinearWithLoRA
            width = columns.adapter.qkv_width
            layer = columns_with_lora_class(base)(projection, columns.start, columns.stop, width)
            layer.create_lora_weights(lora_config.max_loras, lora_config, model.config)
        model.set_submodule(name, layer)
        columns.adapter.requested = True


def lora_layer(projection: nn.Module, model: nn.Module, qkv: str, lora_config: Any) -> nn.Module:
    """Layer 0's q/k/v with LoRA slots, shaped and sharded like `projection`."""
    packed = len(getattr(model, "packed_modules_mapping", {}).get(qkv, ["q", "k", "v"]))
    if lora_config.fully_sharded_loras and projection.tp_size > 1:
        raise FirstLayerError(
            "fully_sharded_loras shards an adapter's A over ranks, which layer 0's precomputed "
            "q/k/v do not: serve without --fully-sharded-loras"
        )
    layer = rows_with_lora_class(packed)(projection, projection.output_size_per_partition)
    layer.create_lora_weights(lora_config.max_loras, lora_config, model.config)
    return layer


def refuse_adapter(hf_config: Any, folder: str | Path, name: str) -> None:
    """Raise if a PEFT adapter folder targets what the table replaced and vLLM cannot apply
    exactly (the transformers side's rules, `hf.adapters`), naming the modules, why, and the
    way forward."""
    adapter_targets(hf_config).refuse(adapter_module_names(Path(folder)), f"LoRA adapter {name!r}")


def guard_manager(manager: Any, hf_config: Any, vllm_name: Callable[[str], str]) -> None:
    """Wrap a LoRA manager's add_adapter (what `add_lora` and a request's first use of an
    adapter call, right after loading its weights) to refuse what is not exact, by the names
    vLLM gave the adapter's modules (`vllm_name` maps the original's to them)."""
    targets = adapter_targets(hf_config)
    in_vllm = AdapterTargets(
        frozenset(vllm_name(n) for n in targets.exact),
        vllm_name(targets.embedding),
        {vllm_name(n): why for n, why in targets.refused.items()},
    )
    add_adapter = manager.add_adapter

    @functools.wraps(add_adapter)
    def checked(lora: Any) -> Any:
        in_vllm.refuse(list(lora.loras), f"LoRA adapter {lora.id}")
        return add_adapter(lora)

    manager.add_adapter = checked


def guard_front_end() -> None:
    """Check a request's adapter in the front end, before the engine sees it: refused there, the
    request fails and the engine serves on. Idempotent."""
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_lora
    if getattr(validate, "firstlayer", False):
        return

    @functools.wraps(validate)
    def validate_lora(self: Any, lora_request: Any) -> None:
        validate(self, lora_request)
        hf_config = self.model_config.hf_config
        if lora_request is not None and getattr(hf_config, "firstlayer", None):
            refuse_adapter(hf_config, lora_request.lora_path, lora_request.lora_name)

    validate_lora.firstlayer = True
    InputProcessor._validate_lora = validate_lora
