"""llama.cpp through llama-cpp-python's C API: load a GGUF file, decode batches of tokens from one
or more sequences (as llama-server's parallel slots share a batch), read their logits. Also
whether the installed build carries the token_qkv patch."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from firstlayer.errors import FirstLayerError

# The patch's one new string in libllama: a build without it has never heard of the table.
PATCH_MARKER = b"token_qkv"
F32_TYPE = 0  # ggml's GGML_TYPE_F32
# What the log keeps of a failed load, for the error message.
LOG_LINES_KEPT = 40


def patched_build_problem() -> str | None:
    """None when the installed llama_cpp package's libllama carries the token_qkv patch; else why
    precomputed GGUF files cannot run here, and the fix."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return "the llama_cpp package is not installed: run `make llama-cpp`"
    libraries = [
        p for loc in spec.submodule_search_locations for p in Path(loc).glob("lib/libllama*")
    ]
    if not libraries:
        return "the llama_cpp package has no libllama in its lib folder: run `make llama-cpp`"
    if not any(PATCH_MARKER in p.read_bytes() for p in libraries):
        return (
            "the installed llama_cpp package is a stock build, without "
            "llama.cpp/0001-token-qkv.patch (it refuses precomputed files): run `make llama-cpp`"
        )
    return None


def llama_server_path() -> Path | None:
    """llama.cpp's own llama-server from the same patched build, where `make llama-cpp` put it
    (beside this environment's python), else None."""
    server = Path(sys.executable).parent / "llama-server"
    return server if server.is_file() else None


class _Log:
    """llama.cpp's log, kept (its last lines) rather than printed: a refusal's reason is in it.
    One for the process: llama.cpp holds the callback for good, so it must never be freed."""

    lines: list[str] = []
    callback: Any = None

    @classmethod
    def install(cls, llama_cpp: Any) -> None:
        if cls.callback is None:

            @llama_cpp.llama_log_callback
            def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                cls.lines = [*cls.lines[-LOG_LINES_KEPT:], text.decode("utf-8", "replace")]

            cls.callback = callback
        llama_cpp.llama_log_set(cls.callback, ctypes.c_void_p(0))

    @classmethod
    def errors(cls) -> str:
        lines = "".join(cls.lines).splitlines()
        wanted = [line for line in lines if "error" in line or "failed" in line]
        return "; ".join(line.strip() for line in (wanted or lines)[-3:])


class Engine:
    """One model and one context: `decode` runs a batch and returns the logits it asked for."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_seq_max: int = 1,
        n_threads: int = 1,
        kv_cache_f32: bool = False,
        use_mmap: bool = True,
    ):
        """`kv_cache_f32`: keys and values cached in F32 and flash attention off, so that no
        float16 rounding of q, k or v stands between two files' arithmetic (llama.cpp's default,
        an F16 cache, turns a float32 rounding difference in k into a float16 one). `use_mmap`
        False: the weights read into memory of llama.cpp's own instead of mapped."""
        import llama_cpp

        self.lib = llama_cpp
        _Log.install(llama_cpp)
        self.log = _Log
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = use_mmap
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise FirstLayerError(f"llama.cpp refused {path}: {self.log.errors()}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = n_threads
        if kv_cache_f32:
            params.type_k = params.type_v = F32_TYPE
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise FirstLayerError(f"llama.cpp made no context for {path}: {self.log.errors()}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[int],
        logits: Sequence[bool],
    ) -> np.ndarray:
        """One llama_decode of a batch: token i at position i of sequence i; returns the logits
        of the tokens marked in `logits`, (n, V) float32, in batch order."""
        lib, n = self.lib, len(tokens)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i], batch.pos[i] = tokens[i], positions[i]
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seqs[i]
                batch.logits[i] = logits[i]
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise FirstLayerError(f"llama_decode returned {status}: {self.log.errors()}")
            rows = [i for i in range(n) if logits[i]]
            if not rows:
                return np.empty((0, self.n_vocab), np.float32)
            return np.stack(
                [
                    np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), (self.n_vocab,))
                    for i in rows
                ]
            ).copy()
        finally:
            lib.llama_batch_free(batch)

    def greedy(
        self, prompt: Sequence[int], steps: int, seq: int = 0, prompt_batch: int | None = None
    ) -> list[int]:
        """`steps` greedy tokens after `prompt`, each decoded on the KV cache (cleared first);
        the prompt in one batch, or `prompt_batch` tokens at a time."""
        self.clear()
        size = prompt_batch or len(prompt)
        for start in range(0, len(prompt), size):
            part = prompt[start : start + size]
            ends = [start + i == len(prompt) - 1 for i in range(len(part))]
            last = self.decode(part, range(start, start + len(part)), [seq] * len(part), ends)
        tokens: list[int] = []
        for position in range(len(prompt), len(prompt) + steps):
            tokens.append(int(np.argmax(last[-1])))
            last = self.decode(tokens[-1:], [position], [seq], [True])
        return tokens

    def clear(self) -> None:
        """Forget every sequence's KV cache."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
