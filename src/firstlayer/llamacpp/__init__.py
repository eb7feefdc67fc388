"""llama.cpp: a GGUF file's precomputed twin (`export`), layer 0's token-local part as llama.cpp's
graph computes it (`layer0`), and the patched build that runs it (`build`). The patch itself,
`0001-token-qkv.patch`, lives in the repository's `llama.cpp/` folder."""
