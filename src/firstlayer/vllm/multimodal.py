"""Precomputed multimodal folders in vLLM: vLLM's own wrapper class (Gemma 3, LLaVA, Mistral 3,
Qwen2.5-VL), its language model's layer 0 run from the table, image positions through layer 0's
kept norm and q/k/v.

vLLM's runner feeds a multimodal model by embeddings at every step: it calls
`embed_input_ids(ids, image features, is_multimodal=mask)` eagerly, the mask on the CPU, copies
the result into a buffer of `ModelConfig.get_inputs_embeds_size()` columns, and calls
`forward(input_ids=None, inputs_embeds=...)`. Here `embed_input_ids` returns the table's rows,
`[x | q k v]`, the text route's layer-0 input (`models.TableRows`): the table's at token
positions, `[f | qkv(norm(f))]` at image positions (f, the projector's features), computed by the
kept norm and projection. The mask indexes on the CPU side as vLLM's own merge does, so a step
costs no device sync; a decode step brings no features and runs no kept projection. The runner's
buffer is widened to the row (`checks.widen_inputs_embeds`), so the rows reach layer 0 unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from firstlayer.errors import FirstLayerError
from firstlayer.families import VllmOwnClass, family_of
from firstlayer.families.multimodal import LANGUAGE_MODEL, TEXT_FAMILIES
from firstlayer.folder import head_norms_in_table, keeps_attn_norm, kept_layer0
from firstlayer.table.layout import TableLayout
from firstlayer.vllm.models import (
    SOURCE,
    PrecomputedInVllm,
    checked_before_building,
    install_table,
    refuse_missing,
    vllm_name,
)

# The kept q/k/v projection's place in the wrapper (not inside layer 0, whose loader would take
# its weights for the table's).
KEPT = "firstlayer_kept_qkv"
# Projections a kept module name may end in, and their shard of vLLM's fused projection.
SHARDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


def text_route(config: Any) -> VllmOwnClass:
    """vLLM's own class route of the folder's language model, refused where it is another."""
    text_type = config.text_config.model_type
    text_type = TEXT_FAMILIES.get(text_type, text_type)
    route = family_of(text_type).vllm_route(text_type)
    if not isinstance(route, VllmOwnClass) or route.kind != "serial":
        raise FirstLayerError(
            "firstlayer's vLLM plugin serves multimodal folders whose language model is a "
            f"serial family of vLLM's own classes; this one's is {text_type}: run it with "
            "transformers (AutoModelForImageTextToText)"
        )
    if head_norms_in_table(config.firstlayer, is_parallel=False) and route.head_norms:
        raise FirstLayerError(
            "this multimodal folder's table holds q and k after layer 0's q/k norms (written "
            "before format 6), which its image positions would need applied too: convert the "
            "source again"
        )
    return route


class PrecomputedMultimodal(PrecomputedInVllm):
    """Mixed in before vLLM's multimodal wrapper class (LLaVA's, Gemma 3's, ...)."""

    model_type: str

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        memory = checked_before_building(vllm_config)
        config = vllm_config.model_config.hf_config
        record = config.firstlayer
        route = text_route(config)
        if record["table"]["dtype"] == "int8" or not keeps_attn_norm(record):
            raise FirstLayerError(
                "firstlayer's vLLM plugin serves multimodal folders with a float table and layer "
                "0's norm kept (as `firstlayer convert` writes them): convert the source again"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hf_config = config
        self.firstlayer_record = record
        self.route = route
        language_model = self.get_language_model()
        layer = language_model.get_submodule(route.layer)
        attention = layer.get_submodule(route.attention)
        # Layer 0's own projection, before the table replaces it: image positions run it.
        self.add_module(KEPT, attention.get_submodule(route.qkv))
        # The language model's own record: its table module under the causal LM's names.
        text_record = {
            **record,
            "table": {**record["table"], "module": self.text_name(record["table"]["module"])},
        }
        install_table(language_model, route, text_record, config.text_config.vocab_size, memory)
        self.table_name = vllm_name(language_model, text_record["table"]["module"])

    @staticmethod
    def text_name(name: str) -> str:
        """A folder's language-model name as the causal LM names it (`model.language_model.X` ->
        `model.X`)."""
        if not name.startswith(f"{LANGUAGE_MODEL}."):
            raise FirstLayerError(f"{name} is not under {LANGUAGE_MODEL}: convert the source again")
        return "model." + name.removeprefix(f"{LANGUAGE_MODEL}.")

    def table_rows(self) -> nn.Module:
        return self.get_language_model().get_submodule(self.table_name)

    def kept_rows(self, features: Tensor) -> Tensor:
        """`[f | q k v]` of features f, by layer 0's kept norm and projection."""
        norm = self.get_language_model().get_submodule(self.route.layer)
        norm = norm.get_submodule(self.route.norms[0]).kept_norm
        qkv, _ = getattr(self, KEPT)(norm(features))
        return torch.cat([features, qkv], dim=-1)

    def embed_input_ids(
        self,
        input_ids: Tensor,
        multimodal_embeddings: Any = None,
        *,
        is_multimodal: Tensor | None = None,
    ) -> Tensor:
        rows = self._embed_text_input_ids(input_ids, self.table_rows(), is_multimodal=is_multimodal)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return rows
        from vllm.model_executor.models.utils import _flatten_embeddings

        if is_multimodal is None:
            raise FirstLayerError("vLLM passed image features without their positions")
        features = _flatten_embeddings(multimodal_embeddings).to(rows.dtype)
        # A CPU mask indexes without a device sync (vLLM's own merge relies on the same).
        rows[is_multimodal] = self.kept_rows(features).to(rows.dtype)
        return rows

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """vLLM's wrapper loader, fed the table under the names of the modules it fills and the
        kept projection directly; raises if any parameter was left unloaded."""
        if self.firstlayer_loaded:
            return self.load_update(weights)
        record = self.firstlayer_record
        embedding = record["table"]["module"]
        layout = TableLayout.from_dict(record["table"])
        kept = set(kept_layer0(record))
        layer = f"{LANGUAGE_MODEL}.{self.route.layer.removeprefix('model.')}"
        projection = getattr(self, KEPT)
        loaded_here = set()

        def renamed() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in weights:
                module, _, leaf = name.rpartition(".")
                block = name.removeprefix(f"{embedding}.")
                if module in kept:
                    shard = SHARDS.get(module.rpartition(".")[2])
                    parameter = getattr(projection, leaf)
                    parameter.weight_loader(parameter, tensor, shard)
                    loaded_here.add(f"{KEPT}.{leaf}")
                elif block == "residual":
                    yield f"{embedding}.residual.weight", tensor
                elif block.startswith("attn_norm."):
                    norm = f"{layer}.{self.route.norms[0]}.kept_norm"
                    yield f"{norm}.{block.removeprefix('attn_norm.')}", tensor
                elif block == "qkv":
                    for column in layout.columns:
                        start = column.start - layout.hidden_size
                        stop = column.stop - layout.hidden_size
                        name = column.module.rpartition(".")[2]
                        weight = tensor[:, start:stop].t().contiguous()
                        yield f"{embedding}.{SOURCE}.{name}.weight", weight
                else:
                    yield name, tensor

        loaded = set(super().load_weights(renamed())) | loaded_here
        refuse_missing(self, self.hf_config, None, loaded)
        self.table_rows().take_loaded_columns()
        self.firstlayer_loaded = True
        return {n for n in loaded if f".{SOURCE}." not in n}
