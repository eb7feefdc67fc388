"""Precompute the first transformer layer (arXiv 2402.13388): convert, verify and benchmark.

The public API is imported lazily so that `firstlayer analyze` answers without importing torch.
"""

from importlib import import_module
from typing import Any

__all__ = [
    "analyze",
    "precompute",
    "convert",
    "save",
    "load",
    "check",
    "verify",
    "bench",
    "FirstLayerError",
]

_HOMES = {
    "analyze": "firstlayer.savings",
    "precompute": "firstlayer.runtime",
    "convert": "firstlayer.checkpoint",
    "save": "firstlayer.checkpoint",
    "check": "firstlayer.checkpoint",
    "load": "firstlayer.checkpoint",
    "verify": "firstlayer.verify",
    "bench": "firstlayer.bench",
    "FirstLayerError": "firstlayer.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'firstlayer' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
