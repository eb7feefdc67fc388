"""The transformers side of firstlayer: precomputed models as registered Auto* classes.

`import firstlayer` registers them as soon as transformers is imported (see firstlayer/__init__),
so `AutoModelForCausalLM.from_pretrained(folder)` and `pipeline(...)` load a converted folder.
"""

from firstlayer.hf.models import (
    PRECOMPUTED_PREFIX,
    adopt,
    config_class,
    model_class,
    precompute,
    precomputed_model_type,
    register,
    source_model_type,
)

__all__ = [
    "PRECOMPUTED_PREFIX",
    "adopt",
    "config_class",
    "model_class",
    "precompute",
    "precomputed_model_type",
    "register",
    "source_model_type",
]
