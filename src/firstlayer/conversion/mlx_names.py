"""Where a folder mlx-lm wrote keeps each weight: mlx-lm's module path, against the names of the
family's published checkpoints.

`mlx_lm.convert` saves each weight under mlx-lm's own module path (its family's `sanitize` renames
the published names, for some families whole prefixes); a conversion reads the folder by the
published names, which transformers' renamings then take, and writes the converted config's
per-module settings back under mlx-lm's paths. mlx-lm is imported only when such a folder is read.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from firstlayer.errors import FirstLayerError
from firstlayer.hf.models import legacy_rope_fields, published_name


def mlx_module_paths(config: dict, state_names: list[str]) -> dict[str, str]:
    """For each module of transformers' model of `config` (by the state-dict names of its
    weights), the path mlx-lm's model of the family gives it: the one name its `sanitize` turns
    the published weight into. Modules it drops or splits have none."""
    try:
        from mlx_lm.utils import _get_classes
    except ImportError:
        raise FirstLayerError(
            "this folder is quantized in mlx-lm's own format, whose weights mlx-lm names: "
            "converting it needs mlx-lm, pip install 'firstlayer[mlx]'"
        ) from None
    try:
        model_class, args_class = _get_classes({"model_type": config["model_type"]})
    except ValueError:
        raise FirstLayerError(
            f"mlx-lm has no model for {config['model_type']}, so it wrote no folder of one: "
            "check the folder's config.json"
        ) from None
    model = model_class(args_class.from_dict({**legacy_rope_fields(config), **config}))  # lazy
    # transformers' model of the config, without mlx-lm's quantization (no method it knows)
    plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config_json = json.dumps(plain, sort_keys=True, default=str)
    paths = {}
    for name in state_names:
        module, _, leaf = name.rpartition(".")
        if module in paths:
            continue
        renamed = mlx_lm_name(model_class, model, config_json, name)
        if renamed is not None and renamed.endswith(f".{leaf}"):
            paths[module] = renamed.removesuffix(f".{leaf}")
    return paths


def mlx_lm_name(model_class: type, model: Any, config_json: str, key: str) -> str | None:
    """The name mlx-lm's `model` (of `model_class`) gives transformers' weight `key`: the
    published name as the family's `sanitize` renames it; None where it drops or splits it."""
    import mlx.core as mx

    published = published_name(config_json, key)
    if not hasattr(model_class, "sanitize"):
        return published
    # On a shallow copy: some families' sanitize drops modules (an untied LM head).
    renamed = list(model_class.sanitize(copy.copy(model), {published: mx.zeros((1, 1))}))
    return renamed[0] if len(renamed) == 1 else None
