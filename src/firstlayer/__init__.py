"""Precompute the first transformer layer (arXiv 2402.13388): convert, verify and benchmark.

The public API is imported lazily so that `firstlayer analyze` answers without importing torch.
Importing firstlayer registers precomputed models with transformers (AutoConfig,
AutoModelForCausalLM) as soon as transformers is imported, before or after firstlayer.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from importlib import import_module
from types import ModuleType
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
    "analyze": "firstlayer.analysis.savings",
    "precompute": "firstlayer.conversion",
    "convert": "firstlayer.conversion",
    "save": "firstlayer.hf.loading",
    "check": "firstlayer.folder",
    "load": "firstlayer.hf.loading",
    "verify": "firstlayer.tools.verify",
    "bench": "firstlayer.tools.bench",
    "FirstLayerError": "firstlayer.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'firstlayer' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


# What firstlayer registers with a library the moment it is imported: transformers (the
# precomputed Auto* classes) and PEFT (how adapters meet a precomputed model).
_REGISTRATIONS = {
    "transformers": ("firstlayer.hf.models", "register_with_transformers"),
    "peft": ("firstlayer.hf.peft", "register_with_peft"),
}


def _register_with(library: str) -> None:
    home, function = _REGISTRATIONS[library]
    getattr(import_module(home), function)()


class _RegisterWhenLibraryLoads(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs a library's registration right after the library's own module has executed, so that
    `import firstlayer` stays torch-free (for `firstlayer analyze`) yet the user's next
    `from transformers import ...` already knows precomputed models."""

    def __init__(self, library: str):
        self.library = library

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.library:
            return None
        # Out of the way while the finders after this one look, and back in place after: a
        # look-up alone (transformers' `is_peft_available` asks for peft's spec) imports nothing,
        # and the import that follows must still come through here.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_with(self.library)


for _library in _REGISTRATIONS:
    if _library in sys.modules:
        _register_with(_library)
    elif not any(
        isinstance(f, _RegisterWhenLibraryLoads) and f.library == _library for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterWhenLibraryLoads(_library))

# Before torchvision imports: where its C++ ops do not load (PyPI's CUDA build beside a CPU
# torch), the two ops its import needs are declared (`firstlayer.torchvision_ops`).
import_module("firstlayer.torchvision_ops").install()
