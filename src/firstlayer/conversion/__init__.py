"""Conversion: a source's weights -> table rows -> a sink -> the self-check (`pipeline`), with
the weight sources in `weights` and the self-check in `selfcheck`."""

from firstlayer.conversion.pipeline import (
    ConvertOptions,
    Plan,
    check_folder_rows,
    convert,
    convert_checkpoint,
    convert_source,
    plan_for,
    precompute,
)
from firstlayer.conversion.selfcheck import SelfCheck
from firstlayer.conversion.weights import NeedsLoading

__all__ = [
    "ConvertOptions",
    "NeedsLoading",
    "Plan",
    "SelfCheck",
    "check_folder_rows",
    "convert",
    "convert_checkpoint",
    "convert_source",
    "plan_for",
    "precompute",
]
