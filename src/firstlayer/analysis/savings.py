"""What precomputing the first layer saves, from the config alone (arXiv 2402.13388, tables 1-2).

Two accountings. `paper` is the paper's: weight matrices only, every MoE expert read and
multiplied, and it reproduces both of its tables to the digit. `exact` counts every parameter the
Hugging Face model holds (biases, norm gains, routers) and reads MoE experts as a router does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from firstlayer.analysis.dims import ModelDims, model_dims
from firstlayer.analysis.quantization import (
    DEFAULT_MODEL_DTYPE,
    MODEL_DTYPE_BYTES,
    Quantization,
    deltas,
    quantization_of,
)
from firstlayer.analysis.sources import (
    PAPER_CONFIG_TABLE,
    PAPER_SAVINGS_TABLE,
    Source,
    resolve_source,
)
from firstlayer.errors import FirstLayerError

Accounting = Literal["paper", "exact"]
ACCOUNTINGS: tuple[Accounting, ...] = ("paper", "exact")
DEFAULT_BATCHES = (1, 16, 256, 1024)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's parameters, split as the paper's table splits them."""

    q_p: int  # query and output (P) projections
    k_v: int
    ffn: int  # every expert, and the router in exact accounting
    norms: int  # norm gains and biases, q/k norms: exact accounting only

    @property
    def total(self) -> int:
        return self.q_p + self.k_v + self.ffn + self.norms


@dataclass(frozen=True)
class BatchReads:
    """Layer 0's reads for a batch of B tokens: weights plus embedding (or table) rows."""

    batch: int
    without: int
    with_: int
    reduction: float


@dataclass(frozen=True)
class Memory:
    """Change in stored parameters: the wider table against the weights it replaces."""

    increase: int
    decrease: int
    net: int
    relative: float  # net / total weights


@dataclass(frozen=True)
class Cost:
    """The per-step pieces that reads and FLOPs at any batch are built from, in weights
    (`Analysis.cost`) or in bytes as the checkpoint stores them (`WeightBytes.cost`; FLOPs mean
    nothing there). A dense FFN is one expert that every token uses, so one formula covers both.
    """

    dense: int  # all layers: what every step reads (attention, norms, router, shared expert)
    expert: int  # all layers: one expert's FFN weights in each, summed
    layer0_expert: int  # layer 0's one expert (a parallel block's goes with the table)
    n_experts: int
    experts_per_token: int
    reads_all_experts: bool  # paper accounting: every expert read and multiplied
    eliminated_dense: int  # layer 0's eliminated weights outside the experts
    eliminates_experts: bool  # parallel blocks: layer 0's experts go too
    head: int  # LM head, with its bias
    final_norm: int
    embedding_row: int  # one token's embedding row: d
    table_row: int  # one token's table row: row_width

    def experts_read(self, batch: int) -> float:
        """Distinct experts a batch reads per layer: n(1 - (1 - k/n)^B) under uniform routing."""
        n, k = self.n_experts, self.experts_per_token
        return n if self.reads_all_experts else n * (1 - (1 - k / n) ** batch)

    @property
    def experts_multiplied(self) -> int:
        return self.n_experts if self.reads_all_experts else self.experts_per_token

    def eliminated_read(self, batch: int) -> float:
        experts = self.eliminates_experts * self.layer0_expert * self.experts_read(batch)
        return self.eliminated_dense + experts

    def reads(self, batch: int, precomputed: bool) -> float:
        """One decode step of `batch` tokens: every weight once, and a row per token."""
        without = self.dense + self.expert * self.experts_read(batch) + self.final_norm + self.head
        if not precomputed:
            return without + batch * self.embedding_row
        return without - self.eliminated_read(batch) + batch * self.table_row

    def flops_saved(self) -> int:
        experts = self.eliminates_experts * self.layer0_expert * self.experts_multiplied
        return 2 * (self.eliminated_dense + experts)

    def flops_without(self) -> int:
        return 2 * (
            self.dense + self.expert * self.experts_multiplied + self.final_norm + self.head
        )


@dataclass(frozen=True)
class WeightBytes:
    """The weights in bytes as the checkpoint stores them: quantized Linears at their scheme's
    size, everything else in the model's dtype (an unquantized model: 16-bit, as accelerators run
    it). The table's row is in the model's dtype here; `placement` prices the others."""

    quantization: Quantization | None
    model_bytes: int
    stored: int  # every weight of the checkpoint
    freed: int  # layer 0's eliminated weights, as stored: `Memory.decrease` in bytes
    cost: Cost  # one decode step's reads, in bytes

    @property
    def model_dtype(self) -> str:
        return self.quantization.model_dtype if self.quantization else DEFAULT_MODEL_DTYPE

    @property
    def scheme(self) -> str:
        return self.quantization.label if self.quantization else f"{self.model_dtype} (dense)"


@dataclass(frozen=True)
class Analysis:
    """One model's costs with and without the precomputed first layer, in one accounting."""

    name: str
    dims: ModelDims
    accounting: Accounting
    row_width: int  # d + q_dim + 2e; the first d columns hold x (serial) or x + FFN(n2(x))
    layer: LayerWeights
    embeddings: int  # input + output embedding (once when tied), LM-head bias in exact
    final_norm: int
    total_weights: int
    eliminated_weights: int
    reads: tuple[BatchReads, ...]
    memory: Memory
    cost: Cost
    weight_bytes: WeightBytes

    @property
    def is_quantized(self) -> bool:
        return self.weight_bytes.quantization is not None

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(r.batch for r in self.reads)

    @property
    def max_saving(self) -> float:
        """The paper's bound: one layer of n_layers is all the trick can save."""
        return 1 / self.dims.n_layers

    def layer0_reads(self, batch: int, precomputed: bool) -> int:
        if precomputed:
            return batch * self.row_width
        return round(batch * self.dims.d + self.cost.eliminated_read(batch))

    def weights_read_per_step(self, batch: int, precomputed: bool) -> int:
        """Parameters read in one decode step of `batch` tokens (each weight read once)."""
        return round(self.cost.reads(batch, precomputed))

    def bytes_read_per_step(
        self, batch: int, precomputed: bool, table_row_bytes: int | None = None
    ) -> int:
        """Bytes read in one decode step, weights as stored; the table's row in the model's dtype
        unless `table_row_bytes` prices another (`placement` does, per table dtype)."""
        cost = self.weight_bytes.cost
        if table_row_bytes is not None:
            cost = replace(cost, table_row=table_row_bytes)
        return round(cost.reads(batch, precomputed))

    def flops_per_token(self, precomputed: bool) -> int:
        """2 x weights multiplied per token; attention scores are left out."""
        return self.cost.flops_without() - (self.cost.flops_saved() if precomputed else 0)

    def decode_ceiling(self, batch: int) -> float:
        """Decode speed-up if a step is bound by reading weights (KV-cache reads left out): in
        bytes for a quantized checkpoint, whose layers are not all stored alike."""
        reads = self.bytes_read_per_step if self.is_quantized else self.weights_read_per_step
        return reads(batch, False) / reads(batch, True)

    def prefill_flops(self, prompt_tokens: int, precomputed: bool) -> int:
        """FLOPs of one prompt whose logits are taken at its last position only, as generate()
        does: the LM head runs once, every other weight once per token."""
        head = 2 * self.cost.head
        return prompt_tokens * (self.flops_per_token(precomputed) - head) + head

    def prefill_ceiling(self, batch: int, prompt_tokens: int | None = None) -> float:
        """Prefill speed-up if bound by FLOPs; per-token FLOPs do not depend on the batch.

        Without `prompt_tokens`, every token goes through the LM head; with it, only the last
        of each prompt does, which leaves the head out of most of the work.
        """
        if prompt_tokens is None:
            return self.flops_per_token(False) / self.flops_per_token(True)
        return self.prefill_flops(prompt_tokens, False) / self.prefill_flops(prompt_tokens, True)

    def as_json(self) -> dict[str, Any]:
        m = self.dims
        return {
            "model": self.name,
            "model_type": m.model_type,
            "accounting": self.accounting,
            "architecture": m.architecture,
            "attention": m.attention,
            "d": m.d,
            "q_dim": m.q_dim,
            "head_dim": m.head_dim,
            "e": m.e,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads,
            "ffn_type": m.ffn_type,
            "ffn_hidden": m.ffn_hidden,
            "experts": m.n_experts,
            "experts_per_token": m.experts_per_token,
            "vocab_size": m.vocab_size,
            "tied": m.is_tied,
            "row_width": self.row_width,
            "weights_per_layer": asdict(self.layer) | {"total": self.layer.total},
            "embeddings": self.embeddings,
            "eliminated_weights": self.eliminated_weights,
            "total_weights": self.total_weights,
            "reads": [
                {"batch": r.batch, "without": r.without, "with": r.with_, "reduction": r.reduction}
                for r in self.reads
            ],
            "memory": asdict(self.memory),
            "weight_bytes": {
                "scheme": self.weight_bytes.scheme,
                "method": self.weight_bytes.quantization and self.weight_bytes.quantization.method,
                "model_dtype": self.weight_bytes.model_dtype,
                "stored": self.weight_bytes.stored,
                "eliminated": self.weight_bytes.freed,
                "reads_per_step": [
                    {
                        "batch": b,
                        "without": self.bytes_read_per_step(b, False),
                        "with": self.bytes_read_per_step(b, True),
                    }
                    for b in self.batches
                ],
            },
            "whole_model": {
                "reads_per_step": [
                    {
                        "batch": b,
                        "without": self.weights_read_per_step(b, False),
                        "with": self.weights_read_per_step(b, True),
                        "decode_ceiling": self.decode_ceiling(b),
                        "prefill_ceiling": self.prefill_ceiling(b),
                    }
                    for b in self.batches
                ],
                "flops_per_token": {
                    "without": self.flops_per_token(False),
                    "with": self.flops_per_token(True),
                },
                "prefill_ceiling": self.prefill_ceiling(1),
                "max_saving": self.max_saving,
            },
        }


@dataclass(frozen=True)
class Report:
    """What `firstlayer analyze` shows: the paper's word gives each table its own models."""

    config_models: tuple[Analysis, ...]
    savings_models: tuple[Analysis, ...]

    @property
    def models(self) -> tuple[Analysis, ...]:
        unique = {id(a): a for a in (*self.config_models, *self.savings_models)}
        return tuple(unique.values())


def analyze(
    source: Source | ModelDims | Mapping[str, Any] | str,
    accounting: Accounting = "paper",
    batches: Sequence[int] = DEFAULT_BATCHES,
) -> Analysis:
    """Count one model's first-layer and whole-model costs with and without precompute."""
    if accounting not in ACCOUNTINGS:
        raise FirstLayerError(f"unknown accounting {accounting!r}: use one of {ACCOUNTINGS}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise FirstLayerError(f"batch sizes must be positive integers, got {list(batches)}")
    m, quantization = _read(source)
    exact = accounting == "exact"
    layer, expert, router = _layer_weights(m, exact)
    norm = m.extras.norm_vectors * m.d if exact else 0
    lm_bias = m.vocab_size if exact and m.extras.lm_head_bias else 0
    embedding_norm = m.extras.embedding_norm_vectors * m.d if exact else 0
    embeddings = m.vocab_size * m.d * (1 if m.is_tied else 2) + lm_bias + embedding_norm
    final_norm = norm
    row_width = m.d + m.q_dim + 2 * m.e
    eliminated_dense = _eliminated_attention(m, exact)
    if m.is_parallel:
        eliminated_dense += router + (norm if m.extras.has_mlp_norm else 0)
    cost = Cost(
        dense=m.n_layers * (layer.total - m.n_experts * expert),
        expert=m.n_layers * expert,
        layer0_expert=expert,
        n_experts=m.n_experts,
        experts_per_token=m.experts_per_token,
        reads_all_experts=not exact,
        eliminated_dense=eliminated_dense,
        eliminates_experts=m.is_parallel,
        head=m.vocab_size * m.d + lm_bias,
        final_norm=final_norm,
        embedding_row=m.d,
        table_row=row_width,
    )
    eliminated = eliminated_dense + m.is_parallel * m.n_experts * expert
    total = m.n_layers * layer.total + embeddings + final_norm
    memory = _memory(m, exact, row_width, eliminated, total)
    analysis = Analysis(
        name=m.name,
        dims=m,
        accounting=accounting,
        row_width=row_width,
        layer=layer,
        embeddings=embeddings,
        final_norm=final_norm,
        total_weights=total,
        eliminated_weights=eliminated,
        reads=tuple(_batch_reads(cost, b) for b in batches),
        memory=memory,
        cost=cost,
        weight_bytes=_weight_bytes(m, quantization, cost, total, memory.decrease),
    )
    _check_bound(analysis)
    return analysis


def analyze_all(
    sources: Sequence[Source | ModelDims | Mapping[str, Any] | str],
    accounting: Accounting = "paper",
    batches: Sequence[int] = DEFAULT_BATCHES,
) -> list[Analysis]:
    return [analyze(s, accounting, batches) for s in sources]


def analyze_specs(
    specs: Sequence[str],
    accounting: Accounting = "paper",
    batches: Sequence[int] = DEFAULT_BATCHES,
) -> Report:
    """The report for command-line SOURCEs; the word `paper` alone gives the paper's layout."""
    if "paper" in specs:
        if len(specs) > 1:
            raise FirstLayerError(
                "`paper` prints the paper's two tables and takes no other SOURCE: run it on its own"
            )
        presets = dict.fromkeys((*PAPER_CONFIG_TABLE, *PAPER_SAVINGS_TABLE))
        by_name = {p: analyze(p, accounting, batches) for p in presets}
        return Report(
            tuple(by_name[p] for p in PAPER_CONFIG_TABLE),
            tuple(by_name[p] for p in PAPER_SAVINGS_TABLE),
        )
    analyses = tuple(analyze_all(specs, accounting, batches))
    return Report(analyses, analyses)


# --- counting ------------------------------------------------------------------------------


def _read(
    source: Source | ModelDims | Mapping[str, Any] | str,
) -> tuple[ModelDims, Quantization | None]:
    """The model's dimensions and, from its config, how its weights are stored."""
    if isinstance(source, ModelDims):
        return source, None
    if isinstance(source, str):
        source = resolve_source(source)
    if isinstance(source, Source):
        dims = model_dims(source.config, source.name)
        return dims, quantization_of(source.config, str(source.path or source.name))
    return model_dims(source), quantization_of(source)


def _layer_weights(m: ModelDims, exact: bool) -> tuple[LayerWeights, int, int]:
    """One layer's parameters, one expert's, and the router's."""
    d, q, e, f = m.d, m.q_dim, m.e, m.ffn_hidden
    q_bias, kv_bias = (q, 2 * e) if exact and m.extras.qkv_bias else (0, 0)
    o_bias = d if exact and m.extras.o_bias else 0
    # Biases of gate/up (f each) and down (d), or of fc_in (f) and fc_out (d).
    mlp_bias = (m.ffn_matrices - 1) * f + d if exact and m.extras.mlp_bias else 0
    expert = m.ffn_matrices * d * f + mlp_bias
    router = m.n_experts * d if exact and m.n_experts > 1 else 0
    lay = m.extras
    norms = lay.norms_per_layer * lay.norm_vectors * d + lay.qk_norm_weights if exact else 0
    norms += lay.small_per_layer if exact else 0
    # A shared expert (gate, up, down) every token reads, and its scalar gate.
    shared = 3 * d * lay.shared_expert_hidden + (d if exact and lay.shared_expert_hidden else 0)
    layer = LayerWeights(
        q_p=d * q + q_bias + q * d + o_bias,
        k_v=2 * d * e + kv_bias,
        ffn=m.n_experts * expert + router + shared,
        norms=norms,
    )
    return layer, expert, router


def _eliminated_attention(m: ModelDims, exact: bool) -> int:
    """Layer 0's token-local attention input: its norm, Q, K, V and their biases, and a parallel
    block's q/k norms (a serial block's run on the table's q/k columns, for adapters' sake)."""
    qkv = m.d * (m.q_dim + 2 * m.e)
    if not exact:
        return qkv
    bias = m.q_dim + 2 * m.e if m.extras.qkv_bias else 0
    norm = m.extras.norm_vectors * m.d if m.extras.has_attn_norm else 0
    return qkv + bias + norm + (m.extras.qk_norm_weights if m.is_parallel else 0)


def _batch_reads(cost: Cost, batch: int) -> BatchReads:
    without = round(batch * cost.embedding_row + cost.eliminated_read(batch))
    with_ = batch * cost.table_row
    return BatchReads(batch, without, with_, without / with_)


def _weight_bytes(
    m: ModelDims, quantization: Quantization | None, cost: Cost, total: int, freed: int
) -> WeightBytes:
    """The weight counts in bytes: each part in the model's dtype, plus what the scheme changes
    in its Linears (`quantization.deltas`)."""
    b = quantization.model_bytes if quantization else MODEL_DTYPE_BYTES
    delta = deltas(m, quantization)
    byte_cost = Cost(
        dense=b * cost.dense + delta.dense,
        expert=b * cost.expert + delta.expert,
        layer0_expert=b * cost.layer0_expert + delta.layer0_expert,
        n_experts=cost.n_experts,
        experts_per_token=cost.experts_per_token,
        reads_all_experts=cost.reads_all_experts,
        eliminated_dense=b * cost.eliminated_dense + delta.qkv0,
        eliminates_experts=cost.eliminates_experts,
        head=b * cost.head + delta.head,
        final_norm=b * cost.final_norm,
        embedding_row=b * cost.embedding_row,
        table_row=b * cost.table_row,
    )
    # Every expert of a layer is stored like the one the deltas price.
    stored = b * total + delta.dense + m.n_experts * delta.expert + delta.head
    freed_bytes = b * freed + delta.qkv0 + m.is_parallel * m.n_experts * delta.layer0_expert
    return WeightBytes(quantization, b, stored, freed_bytes, byte_cost)


def _memory(m: ModelDims, exact: bool, row_width: int, eliminated: int, total: int) -> Memory:
    # The table replaces the input embedding. A tied serial model's LM head reads the table's x
    # columns as a view; a tied parallel one's first columns hold x + FFN(x), so its plain
    # embedding stays for the LM head (the paper's accounting ignores that case).
    keeps_embedding = exact and m.is_tied and m.is_parallel
    increase = (row_width if keeps_embedding else row_width - m.d) * m.vocab_size
    # A serial model keeps layer 0's attention norm beside the table (read only by an adapter's
    # layer-0 part, which needs norm(x)): it leaves the reads, not the memory.
    keeps_norm = exact and not m.is_parallel and m.extras.has_attn_norm
    decrease = eliminated - (m.extras.norm_vectors * m.d if keeps_norm else 0)
    if m.keeps_layer0:  # its q/k/v (and biases) stay too: the table adds to the model
        bias = m.q_dim + 2 * m.e if exact and m.extras.qkv_bias else 0
        decrease -= m.d * (m.q_dim + 2 * m.e) + bias
    net = increase - decrease
    return Memory(increase, decrease, net, net / total)


def _check_bound(a: Analysis) -> None:
    # One of n_layers layers loses weights, so no whole-model saving can pass 1/n_layers. In
    # bytes a quantized layer 0 may weigh more than its share: its own reads bound the saving.
    assert 1 - 1 / a.prefill_ceiling(1) <= a.max_saving + 1e-12, a.name
    cost = a.weight_bytes.cost
    for b in a.batches:
        own = (cost.eliminated_read(b) + b * cost.embedding_row) / cost.reads(b, False)
        bound = own if a.is_quantized else a.max_saving
        assert 1 - 1 / a.decode_ceiling(b) <= bound + 1e-12, (a.name, b)
