"""Adapters (PEFT) on a precomputed transformers model.

An adapter that touches what the table replaced (layer 0's token-local modules or the input
embedding) would be dropped silently or fail deep inside PEFT: until firstlayer applies it
exactly, `PeftModel.from_pretrained`, `get_peft_model` and `model.load_adapter` refuse it by name.
Registered when peft is imported (see firstlayer/__init__).
"""

from __future__ import annotations

import functools
from typing import Any

from firstlayer.errors import FirstLayerError


def refuse_adapters_on_precomputed(model: Any) -> None:
    record = getattr(getattr(model, "config", None), "firstlayer", None)
    if record:
        raise FirstLayerError(
            "adapters (PEFT, LoRA) on a precomputed model are not applied exactly yet: layer 0's "
            f"{', '.join(record['eliminated'])} are rows of its table, so an adapter's layer-0 "
            "part would be lost: load the adapter on the original model, or merge it there "
            "(merge_and_unload) and convert the merged model"
        )


def register_with_peft() -> None:
    """Make PEFT's adapter injection refuse precomputed models. Idempotent."""
    from peft.tuners.tuners_utils import BaseTuner

    if getattr(BaseTuner.inject_adapter, "firstlayer", False):
        return
    inject = BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_adapter(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        refuse_adapters_on_precomputed(model)
        return inject(self, model, *args, **kwargs)

    inject_adapter.firstlayer = True
    BaseTuner.inject_adapter = inject_adapter
