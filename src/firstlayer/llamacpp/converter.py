"""A Hugging Face folder as a GGUF file, by llama.cpp's own converter: `convert_hf_to_gguf.py` from
the same llama-cpp-python sdist the patched build comes from, which `make llama-cpp` keeps in its
cache. llama.cpp's converter is the model of every family's layout (q/k permuted for its rotary
order, NeoX's q, k, v gathered), so the precomputed file is written from its output."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from firstlayer.errors import FirstLayerError

# The converter's --outtype for a dtype name; "auto" keeps the checkpoint's 16-bit type.
OUTTYPES = {None: "auto", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def cache_root() -> Path:
    """Where `make llama-cpp` (llama.cpp/build.sh) caches the wheel and the converter."""
    if "FIRSTLAYER_CACHE" in os.environ:
        return Path(os.environ["FIRSTLAYER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "firstlayer"


def converter_path() -> Path:
    """The cached convert_hf_to_gguf.py of the installed llama-cpp-python's version."""
    try:
        installed = version("llama_cpp_python")
    except PackageNotFoundError:
        raise FirstLayerError(
            "a Hugging Face folder is converted by llama.cpp's convert_hf_to_gguf.py, which "
            "`make llama-cpp` installs with the patched llama-cpp-python: run it first"
        ) from None
    script = cache_root() / "llama-cpp" / f"convert-{installed}" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FirstLayerError(f"{script} is missing: run `make llama-cpp`, which caches it")
    return script


def hf_to_gguf(folder: Path, out: Path, dtype: str | None = None) -> Path:
    """Write a Hugging Face folder as a GGUF file (weights in `dtype`, default the folder's)."""
    if dtype not in OUTTYPES:
        raise FirstLayerError(f"dtype {dtype!r}: one of {', '.join(d for d in OUTTYPES if d)}")
    command = [sys.executable, str(converter_path()), str(folder), "--outfile", str(out)]
    run = subprocess.run([*command, "--outtype", OUTTYPES[dtype]], capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-5:])
        raise FirstLayerError(f"llama.cpp's converter refused {folder}:\n{tail}")
    return out
