"""Precomputed against original: logits on a left-padded batch, greedy continuations, and the
weights each holds. A precomputed model computes the same function, so in float32 the logits agree
to rounding and the greedy tokens are identical.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from firstlayer.hf.patch import parts_of
from firstlayer.table.build import TokenLocal
from firstlayer.table.layout import BLOCKS, table_layout

# float32 logits of the two models differ only by summation order (x + mlp(x) added before, not
# after, the attention output) and the table's float32 rounding: ~1e-6 on real models.
FLOAT32_LOGIT_TOLERANCE = 1e-4
# In bfloat16 the other layers' rounding dominates both models' logit errors, and which of the two
# ends closer to float32 on one batch is chance (docs/measurements.md). Past this factor something
# is broken, not unlucky.
REDUCED_PRECISION_LOGIT_FACTOR = 1.5
# A table stored below the model's precision (float16, bfloat16 or int8 under a float32 model,
# int8 under a bfloat16 one) passes when its end-to-end mean |logit diff| is within the same
# factor of what running the original in bfloat16 costs (in the model's own reduced dtype when
# it has one): the table may cost no more accuracy than the everyday cheaper way does.
REFERENCE_REDUCED_DTYPE = torch.bfloat16
# Table rows compared with the original's own layer-0 arithmetic: every k-th token id, up to this.
LAYER0_SAMPLE_ROWS = 4096

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Hi",
    "Write a short poem about the sea, the wind and the long grey evenings of November.",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Explain in one sentence why the sky is blue.",
)


@dataclass(frozen=True)
class VerifyReport:
    FLOAT32_LOGIT_TOLERANCE: ClassVar[float] = FLOAT32_LOGIT_TOLERANCE
    REDUCED_PRECISION_LOGIT_FACTOR: ClassVar[float] = REDUCED_PRECISION_LOGIT_FACTOR

    dtype: str
    table_dtype: str  # the qkv block's stored dtype
    max_logit_diff: float
    mean_logit_diff: float
    token_agreement: float  # share of positions whose argmax token agrees
    greedy_tokens: int  # new tokens generated per prompt
    greedy_agreement: float  # share of generated tokens that agree
    greedy_equal: bool
    params_before: int
    params_after: int
    # For a reduced precision: the same original run in that dtype, against float32 ...
    baseline_max_logit_diff: float | None = None
    baseline_mean_logit_diff: float | None = None
    baseline_dtype: str | None = None  # the dtype that original ran in
    # ... and layer 0, where the two models differ: the table's entries and the original's own
    # layer-0 outputs in that dtype, each against float32 (max, mean |error|).
    table_error: tuple[float, float] | None = None
    baseline_layer0_error: tuple[float, float] | None = None

    @property
    def passed(self) -> bool:
        if self.table_error is None:
            return self.max_logit_diff <= FLOAT32_LOGIT_TOLERANCE and self.greedy_equal
        bound = REDUCED_PRECISION_LOGIT_FACTOR * self.baseline_mean_logit_diff
        if self.table_dtype != self.dtype:
            return self.mean_logit_diff <= bound  # a table below the model's precision
        # At layer 0 the table must be at least as close to float32 as the original's own
        # arithmetic in that dtype; end to end, no further than the shared layers make chance.
        layer0_closer = all(
            t <= b for t, b in zip(self.table_error, self.baseline_layer0_error, strict=True)
        )
        return layer0_closer and self.mean_logit_diff <= bound

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# What a quantized Linear keeps beside its weight (compressed-tensors' scales, zero points and
# int64 `weight_shape`, fine-grained FP8's `weight_scale_inv`), and an int8 table's scales: not
# weights, and not what `analyze --accounting exact` counts.
NOT_WEIGHTS = ("_scale", "_scale_inv", "_zero_point", "_shape", "_g_idx")


def weights_count(model: nn.Module) -> int:
    """Weights the model holds, each once: a tied LM head (the table's x block) counts once."""
    # Tied parameters appear once.
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(NOT_WEIGHTS))


def prompt_batch(tokenizer: Any | None, prompts: tuple[str, ...], vocab_size: int) -> dict:
    """A left-padded batch of prompts of mixed lengths (random ids when there is no tokenizer)."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        lengths = [3, 1, 17, 8, 5, 12]
        ids = torch.randint(0, vocab_size, (len(lengths), max(lengths)), generator=generator)
        mask = torch.zeros_like(ids)
        for row, length in enumerate(lengths):
            mask[row, -length:] = 1
        return {"input_ids": ids * mask, "attention_mask": mask}
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(list(prompts), return_tensors="pt", padding=True))


def logit_diffs(a: Tensor, b: Tensor, mask: Tensor) -> tuple[float, float, float]:
    """max and mean |a - b| and argmax agreement over the unpadded positions."""
    keep = mask.bool()
    diff = (a.float() - b.float()).abs()[keep]  # (N, V)
    agree = (a.argmax(-1) == b.argmax(-1))[keep].float().mean()
    return diff.max().item(), diff.mean().item(), agree.item()


@torch.inference_mode()
def verify(
    original: nn.Module,
    precomputed: nn.Module,
    tokenizer: Any | None = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
) -> VerifyReport:
    """Compare a precomputed model with its float32 original on the same left-padded batch."""
    batch = prompt_batch(tokenizer, prompts, original.config.get_text_config().vocab_size)
    device = precomputed.get_output_embeddings().weight.device  # a host-kept table is not
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["attention_mask"]
    reference = original(**batch).logits
    result = precomputed(**batch).logits
    max_diff, mean_diff, agreement = logit_diffs(reference, result, mask)
    table = precomputed.get_input_embeddings()
    dtype, table_dtype = table.dtype, table.qkv.dtype
    baseline = table_error = baseline_layer0 = baseline_dtype = None
    if dtype != reference.dtype or table_dtype != dtype:
        # What the original itself loses in a reduced precision, measured the same way.
        baseline_dtype = dtype if dtype != reference.dtype else REFERENCE_REDUCED_DTYPE
        reduced = copy.deepcopy(original).to(baseline_dtype)
        baseline = logit_diffs(reference, reduced(**batch).logits, mask)[:2]
        del reduced
        table_error, baseline_layer0 = layer0_errors(original, precomputed, baseline_dtype)
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    settings["pad_token_id"] = original.generation_config.pad_token_id or 0
    new_a = original.generate(**batch, **settings)[:, mask.shape[1] :]
    new_b = precomputed.generate(**batch, **settings)[:, mask.shape[1] :]
    return VerifyReport(
        dtype=str(dtype).removeprefix("torch."),
        table_dtype=str(table_dtype).removeprefix("torch."),
        max_logit_diff=max_diff,
        mean_logit_diff=mean_diff,
        token_agreement=agreement,
        greedy_tokens=new_a.shape[1],
        greedy_agreement=(new_a == new_b).float().mean().item(),
        greedy_equal=torch.equal(new_a, new_b),
        params_before=weights_count(original),
        params_after=weights_count(precomputed),
        baseline_max_logit_diff=None if baseline is None else baseline[0],
        baseline_mean_logit_diff=None if baseline is None else baseline[1],
        baseline_dtype=None
        if baseline_dtype is None
        else str(baseline_dtype).removeprefix("torch."),
        table_error=table_error,
        baseline_layer0_error=baseline_layer0,
    )


def layer0_errors(
    original: nn.Module, precomputed: nn.Module, dtype: torch.dtype
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(max, mean) |error| against float32 of the table's rows (as the model reads them), and of
    the same rows computed the way the original computes layer 0 in `dtype`, over a sample of
    token ids."""
    parts, parallel = parts_of(original, precomputed.config.firstlayer)
    layout = table_layout(original, parts, parallel)
    exact = TokenLocal(original, parts, layout, dtype=torch.float32)
    reduced = TokenLocal(original, parts, layout, dtype=dtype)
    table = precomputed.get_input_embeddings()
    vocab_size = table.num_embeddings
    ids = torch.arange(0, vocab_size, max(1, vocab_size // LAYER0_SAMPLE_ROWS))

    def rows(source: Any) -> Tensor:
        if isinstance(source, TokenLocal):
            at = ids.to(source.embedding_weight.device)
            return torch.cat([source.residual(at), source.qkv(at)], dim=1).float().cpu()
        return torch.cat([source.lookup(block, ids) for block in BLOCKS], dim=1).float().cpu()

    truth, stored, computed = rows(exact), rows(table), rows(reduced)

    def error(rows: Tensor) -> tuple[float, float]:
        diff = (rows - truth).abs()
        return diff.max().item(), diff.mean().item()

    return error(stored), error(computed)
