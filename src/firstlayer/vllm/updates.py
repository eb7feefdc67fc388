"""Weights that change under a running engine: `collective_rpc("reload_weights", ...)` and the
weight-transfer sessions RL trainers drive (`start_weight_update`, `update_weights`, ...).

vLLM reloads in place: it first takes every layer's tensors off (restoring them from metadata
recorded at start), then feeds the model's `load_weights` the new tensors, then puts back what did
not arrive. A precomputed model's layer 0 is its table, computed from the embedding and layer 0's
weights together; vLLM has no step where the table could be computed again, so new values for any
of those would leave it stale. Such an update is refused, with the reason, before vLLM takes
anything off: the engine serves on with its weights as they were. An update of other weights (a
later layer, an untied LM head) is applied as in the original.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from firstlayer.errors import FirstLayerError

WHY = (
    "its table was computed from the embedding and layer 0's weights together, and an in-place "
    "update would leave it stale: convert the updated model and start an engine on that folder"
)


def refuse_stale_table(model: Any, names: Iterable[str]) -> None:
    """Raise if an update names the table's tensors or what it was computed from."""
    stale = sorted({name for name in names if model.makes_table_stale(name)})
    if stale:
        raise FirstLayerError(
            f"this precomputed model refuses new weights for {', '.join(stale[:4])}"
            f"{', ...' if len(stale) > 4 else ''}: {WHY}"
        )


def guard_updates() -> None:
    """Check reloads and weight updates of a precomputed model before vLLM touches it.
    Idempotent."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    reload = GPUModelRunner.reload_weights
    if getattr(reload, "firstlayer", False):
        return

    @functools.wraps(reload)
    def reload_weights(self: Any, weights_iterator: Any = None, *args: Any, **kwargs: Any):
        model = self.get_model()
        if getattr(model, "makes_table_stale", None) is not None:
            if weights_iterator is None:
                raise FirstLayerError(
                    "reloading a precomputed folder's weights from disk in place is refused: "
                    f"vLLM would reload its table as ordinary weights; {WHY}"
                )
            weights_iterator = list(weights_iterator)  # in memory already: named first
            refuse_stale_table(model, (name for name, _ in weights_iterator))
        return reload(self, weights_iterator, *args, **kwargs)

    start = Worker.start_weight_update

    @functools.wraps(start)
    def start_weight_update(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model_runner.get_model()
        if getattr(model, "makes_table_stale", None) is not None:
            raise FirstLayerError(
                "weight-transfer updates of a precomputed model are refused: they stream a "
                f"model's weights in chunks, whose first would already leave the table behind; "
                f"{WHY}"
            )
        return start(self, *args, **kwargs)

    reload_weights.firstlayer = True
    GPUModelRunner.reload_weights = reload_weights
    Worker.start_weight_update = start_weight_update
