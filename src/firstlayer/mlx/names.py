"""The names mlx-lm gives a family's weights, against the names of its published checkpoints.

A folder `mlx_lm.convert` wrote holds each weight under mlx-lm's module path (its family's
`sanitize` renames the published ones: GPT-NeoX's `gpt_neox.layers.N` becomes `model.h.N`); a
conversion reads it by the published names, which transformers' own renamings then take, and
writes the converted config's per-module settings back under mlx-lm's paths.
"""

from __future__ import annotations

import copy
import json

import mlx.core as mx

from firstlayer.mlx.models import checkpoint_name, family_classes, legacy_rope_fields


def mlx_module_paths(config: dict, state_names: list[str]) -> dict[str, str]:
    """For each module of transformers' model (by the state-dict names of its weights), the path
    mlx-lm's model of the family gives it: the one name its `sanitize` turns the published
    weight into."""
    model_class, args_class = family_classes(config["model_type"])
    model = model_class(
        args_class.from_dict({**legacy_rope_fields(config), **config})
    )  # lazy: no weights are made
    sanitize = getattr(model, "sanitize", None)
    # transformers' model of the config, without mlx-lm's quantization (no method it knows)
    plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config_json = json.dumps(plain, sort_keys=True)
    paths = {}
    for name in state_names:
        module, _, leaf = name.rpartition(".")
        if module in paths:
            continue
        published = checkpoint_name(config_json, name)
        renamed = [published]
        if sanitize is not None:
            # On a shallow copy: some families' sanitize drops modules (an untied LM head).
            renamed = list(type(model).sanitize(copy.copy(model), {published: mx.zeros((1, 1))}))
        if len(renamed) == 1 and renamed[0].endswith(f".{leaf}"):
            paths[module] = renamed[0].removesuffix(f".{leaf}")
    return paths
