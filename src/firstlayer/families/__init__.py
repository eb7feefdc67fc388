"""Every decoder family firstlayer knows: one declaration per family (or per group sharing
Llama's module names), a module of this package each, found by listing the package; the refused
ones in `catalog`. Adding a family is adding a module here (and a tiny test config).

No torch, no transformers: `firstlayer analyze` and `firstlayer families` read this too.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from firstlayer.errors import FirstLayerError
from firstlayer.families.base import (
    ACTIVATION,
    BY_CONFIG,
    FFN,
    PARALLEL,
    REGISTRY,
    SERIAL,
    Family,
    LayerExtras,
    Parts,
    VllmBackend,
    VllmNotServed,
    VllmOwnClass,
    VllmRoute,
    first,
    integer,
    register_family,
)
from firstlayer.families.catalog import (
    ABSOLUTE_POSITIONS,
    GGUF_ARCHITECTURES,
    NOT_APPLICABLE,
    NOT_YET,
    REFUSED,
)

SUPPORTED = "supported"
# The paper's hypothetical parallel Mixtral has no Hugging Face form: a config that sets this key
# says its blocks are parallel (or not) whatever its family's are.
HYPOTHETICAL_PARALLEL = "firstlayer_hypothetical_parallel"
STATUSES = (SUPPORTED, NOT_APPLICABLE, NOT_YET)

# Every module of this package but the shared ones declares families when imported; Llama's
# first, so that lists open with the family most others follow.
_DECLARATIONS = sorted(
    (m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "catalog")),
    key=lambda name: (name != "llama", name),
)
for _module in _DECLARATIONS:
    importlib.import_module(f"{__name__}.{_module}")

from firstlayer.families.multimodal import MULTIMODAL  # noqa: E402  (declared above)

SUPPORTED_TYPES: tuple[str, ...] = tuple(REGISTRY)
# Image-text-to-text models whose language model is of a supported family (transformers only).
MULTIMODAL_TYPES: tuple[str, ...] = tuple(MULTIMODAL)
_REFUSED = {t: refused for refused in REFUSED for t in refused.model_types}


class GenericFamily(Family):
    """How the analyser reads a model type nobody declared: the generic field names, a
    Llama-style layer, experts where the config names them, the MLP's shape guessed from its
    activation. Its figures are estimates, and the report says so."""

    is_known = False
    is_moe = True  # reads the expert count wherever a config states one

    def ffn_matrices(self, cfg: Mapping[str, Any]) -> int:
        return 3 if first(cfg, ACTIVATION) in ("silu", "swish") else 2

    def ffn_hidden(self, cfg: Mapping[str, Any], d: int) -> int:
        ratio = cfg.get("expansion_ratio", 4)
        return integer(cfg, ("moe_intermediate_size", *FFN), default=int(ratio * d))


GENERIC = GenericFamily()


def family_of(model_type: str) -> Family:
    """The declaration of a family firstlayer converts, or a FirstLayerError saying why not
    (not applicable, or not supported yet, naming the supported ones)."""
    if model_type in MULTIMODAL:
        return MULTIMODAL[model_type]
    refuse_not_supported(model_type)
    return REGISTRY[model_type]


def reading_of(model_type: str) -> Family:
    """How the analyser reads a model type: its declaration, or the generic reading."""
    return REGISTRY.get(model_type) or MULTIMODAL.get(model_type, GENERIC)


def config_with_defaults(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A config (dict or transformers config) as a plain dict, with its family's declared
    defaults under the fields it leaves out. Refuses a config without model_type and a family
    the method does not apply to."""
    if not isinstance(config, Mapping):
        config = config.to_dict()
    t = config.get("model_type")
    if not t:
        raise FirstLayerError(
            "the config has no model_type, so its family is unknown: pass the config.json that "
            'comes with the Hugging Face checkpoint (it names the family, e.g. "llama")'
        )
    refuse_not_applicable(t)
    present = {k: v for k, v in config.items() if v is not None}
    return {**reading_of(t).defaults.get(t, {}), **present}


def family_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A config as a dict with its family's own model type, also for a precomputed model's config
    (whose `model_type` is firstlayer's name for it and whose record names the family)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    record = values.get("firstlayer")
    return {**values, "model_type": record["model_type"]} if record else values


def is_parallel(config: Mapping[str, Any] | Any) -> bool:
    """Whether layer 0's attention and FFN both read its input (GPT-J, Pythia, Phi-2, Falcon)."""
    cfg = config_with_defaults(config)
    if HYPOTHETICAL_PARALLEL in cfg:
        return bool(cfg[HYPOTHETICAL_PARALLEL])
    return reading_of(cfg["model_type"]).is_parallel(cfg)


def gguf_model_type(arch: str) -> str:
    """The Hugging Face model type of a GGUF file's general.architecture."""
    for family in {id(f): f for f in REGISTRY.values()}.values():
        if arch in family.gguf:
            return family.gguf[arch]
    return GGUF_ARCHITECTURES.get(arch, arch.replace("-", "_"))


def refuse_not_applicable(model_type: str) -> None:
    """Raise for families the method cannot serve, with the reason."""
    kind = ABSOLUTE_POSITIONS.get(model_type)
    if kind is not None:
        raise FirstLayerError(
            f"{model_type} adds {kind} absolute position embedding to the token embedding before "
            "layer 0, so layer 0's work is not a function of the token id alone (arXiv 2402.13388 "
            "needs RoPE, ALiBi or no position encoding): use a model such as Llama, Mistral, Qwen, "
            "Gemma, Pythia, Phi, Falcon or SmolLM"
        )
    refused = _REFUSED.get(model_type)
    if refused is not None and refused.status == NOT_APPLICABLE:
        raise FirstLayerError(
            f"{model_type} cannot be precomputed: {refused.notes}, so layer 0's work is not a "
            "function of the token id alone (`firstlayer families` lists the supported families)"
        )


def refuse_not_supported(model_type: str) -> None:
    """Raise for a family the converter does not serve: why not, or that it does not yet."""
    refuse_not_applicable(model_type)
    if model_type not in REGISTRY:
        refused = _REFUSED.get(model_type)
        why = f" ({refused.notes})" if refused else ""
        raise FirstLayerError(
            f"model type {model_type!r} is not supported yet{why}; supported: "
            f"{', '.join(SUPPORTED_TYPES)} (`firstlayer analyze` still estimates its savings)"
        )


@dataclass(frozen=True)
class FamilyRow:
    """One row of `firstlayer families`: model types that share a status, blocks and notes."""

    model_types: tuple[str, ...]
    status: str
    blocks: str  # supported: serial, parallel, or "parallel or serial (config)"; else "-"
    notes: str  # supported: what is special; otherwise why it is refused

    def to_dicts(self) -> list[dict]:
        record = {k: v for k, v in asdict(self).items() if k != "model_types"}
        return [{"model_type": t, **record} for t in self.model_types]


def family_rows() -> tuple[FamilyRow, ...]:
    """The declarations, those that read alike (blocks and notes) in one row, then the refused
    families."""
    rows: dict[tuple[str, str], tuple[str, ...]] = {}
    for family in {id(f): f for f in REGISTRY.values()}.values():
        key = (family.blocks, family.notes)
        rows[key] = (*rows.get(key, ()), *family.model_types)
    supported = [FamilyRow(types, SUPPORTED, *key) for key, types in rows.items()]
    refused = [FamilyRow(r.model_types, r.status, "-", r.notes) for r in REFUSED]
    return (*supported, *refused)


def listed_families() -> dict[str, dict]:
    """Every model type firstlayer knows, with its status, blocks and notes."""
    return {d["model_type"]: d for row in family_rows() for d in row.to_dicts()}


__all__ = [
    "MULTIMODAL_TYPES",
    "BY_CONFIG",
    "GENERIC",
    "NOT_APPLICABLE",
    "NOT_YET",
    "PARALLEL",
    "SERIAL",
    "STATUSES",
    "SUPPORTED",
    "SUPPORTED_TYPES",
    "Family",
    "FamilyRow",
    "LayerExtras",
    "Parts",
    "VllmBackend",
    "VllmNotServed",
    "VllmOwnClass",
    "VllmRoute",
    "config_with_defaults",
    "family_config",
    "family_of",
    "family_rows",
    "gguf_model_type",
    "is_parallel",
    "listed_families",
    "reading_of",
    "refuse_not_applicable",
    "refuse_not_supported",
    "register_family",
]
