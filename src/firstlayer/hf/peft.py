"""Adapters (PEFT's LoRA) on a precomputed transformers model, exact.

Layer 0's q/k/v are slices of the table's rows (`hf.patch.Columns`), which PEFT cannot wrap. Its
documented extension point for module types it does not know, `LoraConfig._register_custom_module`,
is per config; PEFT has no registry, so when peft is imported firstlayer registers with it (as it
does with transformers, firstlayer/__init__):

- every LoraConfig maps `Columns` to `ColumnsLora`, which adds the adapter's B·A·norm(x) to the
  rows' slice, norm(x) coming with the rows (`hf.patch.AdapterInput`);
- adapter injection first checks the adapter against `hf.adapters.adapter_targets`, and refuses by
  name what the table replaced and it cannot apply exactly (the embedding, a parallel block's
  layer-0 MLP, q/k before a per-head norm, ...), before anything is wrapped.

    original, with an adapter on layer 0's q_proj:  q = Wq·n(x) + B·A·n(x)
    precomputed:                                    q = T[t, q] + B·A·n(x)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.hf.adapters import FIX, adapter_targets
from firstlayer.hf.patch import Columns

# Rows of the vocabulary folded per chunk when an adapter is merged into the table.
MERGE_CHUNK_ROWS = 4096


def is_precomputed(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "firstlayer", None))


def refuse_what_is_not_exact(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Raise, by module name and reason, if an adapter's config touches what the table replaced
    and cannot be applied there exactly: every tuner on a refused module, a tuner other than
    plain LoRA on layer 0's projections, modules_to_save or trainable tokens there."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import PeftType

    targets = adapter_targets(model.config)
    adapter = f"adapter {adapter_name!r}"
    candidates = [*targets.exact, *targets.refused]
    touched = []
    if getattr(config, "target_modules", None) is not None:
        touched = [n for n in candidates if bool(check_target_module_exists(config, n))]
    saved = getattr(config, "modules_to_save", None) or ()
    touched += [n for n in candidates for m in saved if n == m or n.endswith(f".{m}")]
    if getattr(config, "trainable_token_indices", None):
        touched.append(targets.embedding)
    targets.refuse(touched, adapter)
    variants = [name for name in ("use_dora", "use_bdlora") if getattr(config, name, False)]
    plain_lora = config.peft_type == PeftType.LORA and not variants and not saved
    inexact = sorted(n for n in touched if n in targets.exact and not plain_lora)
    if inexact:
        kind = ", ".join(variants) or str(config.peft_type)
        raise FirstLayerError(
            f"{adapter} applies {kind} to {', '.join(inexact)}, layer 0's precomputed "
            f"projections, which take plain LoRA only: {FIX}"
        )


@functools.cache
def columns_lora_class() -> type:
    """`ColumnsLora`, made on first use: it subclasses PEFT's LoRA Linear, imported only then."""
    from peft.tuners.lora.layer import Linear

    class ColumnsLora(Linear):
        """LoRA on layer 0's precomputed q/k/v (a `Columns`): its input is [q k v | norm(x)],
        its output the columns' slice plus B·A·norm(x), for each active adapter."""

        def __init__(self, base_layer: Columns, adapter_name: str, **kwargs: Any) -> None:
            if base_layer.adapter is None or base_layer.adapter.kind is None:
                raise FirstLayerError(
                    f"a LoRA adapter on layer 0's precomputed projection ({base_layer}) needs "
                    f"norm(x), which this model does not keep: {FIX}"
                )
            super().__init__(base_layer, adapter_name, **kwargs)
            if self.lora_variant:
                raise FirstLayerError(
                    f"LoRA variants ({', '.join(map(str, self.lora_variant.values()))}) are not "
                    f"applied to layer 0's precomputed projections: {FIX}"
                )
            base_layer.adapter.requested = True  # layer 0's attention now receives norm(x)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def forward(self, rows: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            adapter_names = kwargs.pop("adapter_names", None)
            columns = self.get_base_layer()
            result = columns(rows)  # a view of the rows: added to, never written in place
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return result
            if self.merged:
                return result
            normed = rows[..., columns.adapter.qkv_width :]  # (B, T, D): norm(x)
            if adapter_names is None:
                for name in self.active_adapters:
                    if name in self.lora_A:
                        result = result + self.lora_delta(name, normed).to(result.dtype)
                return result
            result = result.clone()
            for name in set(adapter_names) & set(self.lora_A):  # one adapter per sample
                index = [i for i, n in enumerate(adapter_names) if n == name]
                delta = self.lora_delta(name, normed[index])
                result[index] = result[index] + delta.to(result.dtype)
            return result

        def lora_delta(self, name: str, normed: Tensor) -> Tensor:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x = self._cast_input_dtype(normed, lora_a.weight.dtype)
            return lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Fold the adapter's part into the table: every token's columns gain B·A·norm(x)."""
            from peft.tuners.tuners_utils import check_adapters_to_merge

            for name in check_adapters_to_merge(self, adapter_names):
                if name in self.lora_A:
                    self.fold(name, +1.0)
                    self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    self.fold(name, -1.0)

        @torch.no_grad()
        def fold(self, name: str, sign: float) -> None:
            columns = self.get_base_layer()
            table = columns.adapter.table
            if table.qkv.dtype == torch.int8:
                raise FirstLayerError(
                    "merging an adapter into an int8 table would quantize its change anew: "
                    "merge it into the original and convert the merged model"
                )
            qkv = table.qkv.detach().float().clone()  # a copy: the block may be memory-mapped
            normed = columns.adapter.for_vocabulary()  # (V, D)
            for start in range(0, len(normed), MERGE_CHUNK_ROWS):
                chunk = normed[start : start + MERGE_CHUNK_ROWS]
                delta = self.lora_delta(name, chunk).float().to(qkv.device)
                qkv[start : start + len(chunk), columns.start : columns.stop] += sign * delta
            table.replace_block("qkv", qkv.to(table.qkv.dtype))

    return ColumnsLora


def register_with_peft() -> None:
    """Every LoraConfig knows `Columns`; adapter injection refuses what is not exact. Idempotent."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if getattr(LoraConfig, "firstlayer_registered", False):
        return
    post_init = LoraConfig.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        post_init(self, *args, **kwargs)
        self._register_custom_module({Columns: columns_lora_class()})

    inject = BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_adapter(self: Any, model: Any, adapter_name: str, *args: Any, **kwargs: Any):
        if is_precomputed(model):
            refuse_what_is_not_exact(model, self.peft_config[adapter_name], adapter_name)
        return inject(self, model, adapter_name, *args, **kwargs)

    setup = PeftModel._setup_prompt_encoder

    @functools.wraps(setup)
    def _setup_prompt_encoder(self: Any, adapter_name: str) -> None:
        model = self.base_model
        if not is_precomputed(model):
            return setup(self, adapter_name)
        with word_embeddings_named(model):
            return setup(self, adapter_name)

    LoraConfig.__post_init__ = __post_init__
    BaseTuner.inject_adapter = inject_adapter
    PeftModel._setup_prompt_encoder = _setup_prompt_encoder
    LoraConfig.firstlayer_registered = True


@contextlib.contextmanager
def word_embeddings_named(model: nn.Module) -> Iterator[None]:
    """While PEFT sets up a prompt-learning adapter (prompt tuning, p-tuning, prefix tuning):
    the table module under the one name PEFT looks up before guessing the word embeddings from
    the first vocabulary-sized `.weight` (which the table's `residual` is not). Its soft prompts
    then reach the model as inputs_embeds, which a folder converted with layer 0 kept takes."""
    model.embeddings = nn.Module()
    model.embeddings.word_embeddings = model.get_input_embeddings()
    try:
        yield
    finally:
        del model.embeddings
