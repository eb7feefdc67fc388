"""The transformers side of firstlayer: precomputed models as registered Auto* classes
(`models`), the patch that runs layer 0 from the table (`patch`), loading and saving (`loading`).

`import firstlayer` registers the classes as soon as transformers is imported (see
firstlayer/__init__), so `AutoModelForCausalLM.from_pretrained(folder)` and `pipeline(...)` load a
converted folder.
"""

from typing import Any

from firstlayer.hf.models import (
    PRECOMPUTED_PREFIX,
    adopt,
    config_class,
    model_class,
    precomputed_model_type,
    register_with_transformers,
    source_model_type,
)
from firstlayer.hf.models import register_with_transformers as register


def __getattr__(name: str) -> Any:
    if name == "precompute":  # one of the public API's, the conversion pipeline's
        import warnings

        import firstlayer

        warnings.warn(
            "firstlayer.hf.precompute is firstlayer.precompute", DeprecationWarning, stacklevel=2
        )
        return firstlayer.precompute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRECOMPUTED_PREFIX",
    "adopt",
    "config_class",
    "model_class",
    "precomputed_model_type",
    "register",
    "register_with_transformers",
    "source_model_type",
]
