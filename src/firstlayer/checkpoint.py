"""Deprecated: the names this module held live in `firstlayer.conversion` (convert),
`firstlayer.folder` (the folder format, check) and `firstlayer.hf.loading` (load, save)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "convert": "firstlayer.conversion",
    "save": "firstlayer.hf.loading",
    "load": "firstlayer.hf.loading",
    "save_source": "firstlayer.hf.loading",
    "check": "firstlayer.folder",
    "read_record": "firstlayer.folder",
    "weight_files_of": "firstlayer.folder",
    "record_weight_files": "firstlayer.folder",
    "WEIGHTS_FILE": "firstlayer.folder",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _MOVED[name]
    warnings.warn(f"firstlayer.checkpoint.{name} is {home}.{name}", DeprecationWarning, 2)
    return getattr(importlib.import_module(home), name)
