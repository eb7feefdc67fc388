"""Which of a precomputed model's modules an adapter (LoRA) may touch, read from its folder's record
and its family's declaration: the same rules for PEFT (`hf.peft`) and the vLLM plugin.

An adapter's part on a module layer 0 still runs (o_proj, a serial block's MLP, every later layer)
is applied as on the original. Its part on layer 0's q/k/v adds B·A·norm(x) to the table's rows,
exactly, where norm(x) is at hand: a serial block, whose table module keeps layer 0's attention
norm (or whose layer 0 has none). Everything else the table replaced is refused by name:
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firstlayer.errors import FirstLayerError
from firstlayer.families import family_config
from firstlayer.hf.models import original_on_meta
from firstlayer.hf.patch import parts_of

FIX = (
    "merge the adapter into the original model and convert the merged model (`firstlayer "
    "convert SOURCE OUT --adapter DIR`, or PEFT's merge_and_unload before converting)"
)


@dataclass(frozen=True)
class AdapterTargets:
    """Layer 0's modules as the original names them: those an adapter's LoRA reaches exactly,
    and, for every other name the table replaced, why an adapter there is refused."""

    exact: frozenset[str]  # layer 0's q/k/v projections (or fused qkv) that take a LoRA exactly
    embedding: str  # the input embedding the table replaced
    refused: dict[str, str] = field(default_factory=dict)  # module name -> the reason

    def reason(self, name: str) -> str | None:
        """Why an adapter on `name` (or inside it; `*.m`: any module named m) is refused; None
        where it is not."""
        for refused, why in self.refused.items():
            if name.startswith("*.") and (refused.endswith(name[1:]) or refused == name[2:]):
                return why
            if name == refused or name.startswith(refused + "."):
                return why
        return None

    def refuse(self, names: list[str], adapter: str = "the adapter") -> None:
        """Raise, naming each refused module and why, if any of `names` is refused."""
        found = {name: self.reason(name) for name in names}
        found = {name: why for name, why in found.items() if why}
        if found:
            named = "; ".join(f"{name}: {why}" for name, why in sorted(found.items()))
            raise FirstLayerError(
                f"{adapter} targets modules of layer 0 that this precomputed model holds in its "
                f"table and cannot apply an adapter to exactly ({named}): {FIX}"
            )


def adapter_targets(config: Any) -> AdapterTargets:
    """The rules for a precomputed model's config (transformers or a dict)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _targets(json.dumps(family_config(values), sort_keys=True, default=str))


@functools.cache
def _targets(config_json: str) -> AdapterTargets:
    values = json.loads(config_json)
    record = values["firstlayer"]
    original = original_on_meta(values)  # the original's module tree, for its names
    parts, _ = parts_of(original, record)
    is_parallel = record["architecture"] == "parallel"
    adapter_input = record.get("adapter_input")
    names = [name for name, _ in original.named_modules()]
    refused = {
        parts.embedding: "the table replaces the input embedding, and an adapter there would "
        "change every table row"
    }
    if record["lm_head"]["reads_table"]:
        refused[parts.lm_head] = (
            "the tied LM head is the table's x block, which the rows were computed from and a "
            "merge would change under them"
        )
    exact = set()
    for projection in parts.projections:
        if is_parallel:
            refused[projection] = (
                "a parallel block's table rows hold x + mlp(x), not the x an adapter on layer 0's "
                "q/k/v reads"
            )
        elif adapter_input is None:
            refused[projection] = (
                "this folder keeps no layer-0 attention norm, which an adapter on layer 0's "
                "q/k/v reads (it was converted before format 5: convert the source again)"
            )
        elif projection in parts.head_norms:
            refused[projection] = (
                f"it is followed by a q/k norm ({parts.head_norms[projection]}) whose output "
                "this folder's table holds, and an adapter's change enters before that norm "
                "(it was converted before format 6, which keeps q and k before the norm: "
                "convert the source again)"
            )
        else:
            exact.add(projection)
    for module in record["eliminated"]:
        if module in parts.projections:
            continue
        why = (
            "a parallel block's layer-0 MLP is precomputed into the table's first columns as "
            "x + mlp(x), so an adapter there would need them computed again for every token"
            if module == parts.mlp
            else "precomputed into the table"
        )
        refused |= {n: why for n in names if n == module or n.startswith(module + ".")}
    return AdapterTargets(frozenset(exact), parts.embedding, refused)


def adapter_module_names(folder: Path) -> list[str]:
    """The modules a PEFT adapter folder touches, by the model's names: those its weights adapt
    (`adapter_model.safetensors` or `.bin`) and those it saves whole (`modules_to_save`)."""
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(weights, "pt") as handle:
            keys = list(handle.keys())
    elif (folder / "adapter_model.bin").is_file():
        import torch

        keys = list(torch.load(folder / "adapter_model.bin", "cpu", weights_only=True))
    else:
        raise FirstLayerError(
            f"{folder} holds no adapter_model.safetensors (or .bin): pass the folder PEFT's "
            "save_pretrained wrote"
        )
    names = set()
    for key in keys:
        name = key.removeprefix("base_model.model.")
        for marker in (".lora_", ".modules_to_save.", ".trainable_tokens_"):
            name = name.partition(marker)[0]
        names.add(name.removesuffix(".weight").removesuffix(".bias"))
    config = folder / "adapter_config.json"
    if config.is_file():
        saved = json.loads(config.read_text()).get("modules_to_save") or ()
        names |= {f"*.{m}" for m in saved}
    return sorted(names)


@dataclass(frozen=True)
class LoraDeltas:
    """Plain LoRA adapters as changes to the original's weights, for a merged conversion that
    never loads the model: `weight += scaling · B @ A` per adapted module, as PEFT merges."""

    # parameter name ("model.layers.5.self_attn.q_proj.weight") -> [(A (r, in), B (out, r), s)]
    factors: dict[str, list[tuple[Any, Any, float]]]

    def merged_rows(self, name: str, rows: Any, start: int) -> Any:
        """Rows start:start+len(rows) of parameter `name` with each adapter's change added in
        turn, in float32 and rounded to the rows' dtype after each (as PEFT merges one adapter
        after another into a loaded model's weight)."""
        for a, b, scaling in self.factors.get(name, ()):
            delta = (b[start : start + len(rows)].float() @ a.float()) * scaling
            rows = (rows.float() + delta).to(rows.dtype)
        return rows


def plain_lora_deltas(folders: list[Path]) -> LoraDeltas | None:
    """The adapters as `LoraDeltas`, or None where any of them is more than plain LoRA on linear
    weights (DoRA, biases, embeddings, modules it saves whole, fan-in-fan-out): PEFT merges
    those into a loaded model instead."""
    import torch
    from safetensors.torch import load_file

    factors: dict[str, list] = {}
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        weights_file = folder / "adapter_model.safetensors"
        plain = (
            config.get("peft_type") == "LORA"
            and not config.get("use_dora")
            and not config.get("lora_bias")
            and not config.get("fan_in_fan_out")
            and not config.get("modules_to_save")
            and not config.get("trainable_token_indices")
            and weights_file.is_file()
        )
        if not plain:
            return None
        tensors = load_file(weights_file)
        if any("lora_embedding" in k or not k.startswith("base_model.model.") for k in tensors):
            return None
        r, alpha = config["r"], config["lora_alpha"]
        patterns = config.get("rank_pattern") or {}
        alphas = config.get("alpha_pattern") or {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            if module in patterns or module in alphas:
                return None  # per-module ranks: PEFT resolves them
            scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
            factors.setdefault(f"{module}.weight", []).append(
                (a.to(torch.float32), b.to(torch.float32), scaling)
            )
    return LoraDeltas(factors)


def merge_adapters(model: Any, folders: list[Path]) -> Any:
    """The model with each adapter merged into its weights in turn, as PEFT merges them."""
    from peft import PeftModel

    for folder in folders:
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model
