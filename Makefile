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
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,parquet]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Main job until the compression pipeline lands: SmolLM2-135M fp32 vs dynamic int8, quality and cost.
demo: $(STAMP)
	$(VENV)/bin/lmslim fetch all
	$(VENV)/bin/lmslim quantize builtin:smollm2-135m --method dynamic-int8 --out $(DEMO_OUT)/smollm2-int8 --overwrite
	$(VENV)/bin/lmslim eval builtin:smollm2-135m --data builtin:wiki:test --max-tokens 8192 --json $(DEMO_OUT)/fp32-eval.json
	$(VENV)/bin/lmslim eval $(DEMO_OUT)/smollm2-int8 --data builtin:wiki:test --max-tokens 8192 --json $(DEMO_OUT)/int8-eval.json
	$(VENV)/bin/lmslim bench builtin:smollm2-135m --json $(DEMO_OUT)/fp32-bench.json
	$(VENV)/bin/lmslim bench $(DEMO_OUT)/smollm2-int8 --json $(DEMO_OUT)/int8-bench.json
	$(VENV)/bin/lmslim compare $(DEMO_OUT)/fp32-eval.json $(DEMO_OUT)/fp32-bench.json \
	    $(DEMO_OUT)/int8-eval.json $(DEMO_OUT)/int8-bench.json --markdown $(DEMO_OUT)/summary.md
	@echo "results: $(abspath $(DEMO_OUT))"

clean:
	rm -rf $(VENV) runs .pytest_cache
