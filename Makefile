# lmslim: two commands on a fresh machine.
#   make test  - create/reuse .venv and run the test suite (what CI runs)
#   make demo  - create/reuse .venv, fetch the offline assets, run the main job
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmslim-installed
DEMO_OUT ?= runs/demo

.PHONY: test demo venv bench-baseline clean

venv: $(STAMP)

# torch first, pinned: on this machine 2.13.0 is a local CPU build; an unpinned torch would pull a
# multi-GB CUDA build. The project's own range (torch<2.15) is then already satisfied.
# The engines extra compiles llama.cpp (llama-cpp-python) for this CPU once; pip caches the wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q --disable-pip-version-check -e '.[dev,parquet,engines,search]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job: the embedded demo (baseline, dynamic int8, GPTQ int4, Wanda 50%, structured prune +
# KD recovery + int8) and its report. DEMO_FLAGS= (empty) runs the full budgets instead of --quick.
DEMO_FLAGS ?= --quick
demo: $(STAMP)
	$(VENV)/bin/lmslim fetch all
	$(VENV)/bin/lmslim demo $(DEMO_FLAGS) --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
