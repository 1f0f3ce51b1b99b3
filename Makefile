# Every target sets itself up: a fresh clone needs only python3 (>= 3.10).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The benchmark has its own environment: its peers (galore-torch pulls bitsandbytes) stay out of the tests'.
BENCH_VENV ?= .venv-bench
BENCH_PY   := $(BENCH_VENV)/bin/python
BENCH_PIP  := $(BENCH_PY) -m pip

.PHONY: test bench speed memory venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# (Re)install when pyproject.toml or the constraints change.
# The tests run the benchmark's smoke preset, so both targets install the bench extras (no peers).
# A .venv an older `make bench` put the peers in loses them (bitsandbytes broke `from transformers import Trainer`).
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,bench]"
	if [ -f $(VENV)/.installed-peers ]; then $(PIP) uninstall --quiet -y galore-torch adam-mini bitsandbytes; rm -f $(VENV)/.installed-peers; fi
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

$(BENCH_VENV)/bin/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) install --quiet --upgrade pip

# Peers (GaLore, Adam-mini) are optional: the benchmark reports one that is missing as skipped.
$(BENCH_VENV)/.installed: pyproject.toml constraints.txt | $(BENCH_VENV)/bin/python
	$(BENCH_PIP) install --quiet -c constraints.txt torch==2.13.0
	$(BENCH_PIP) install --quiet -c constraints.txt -e ".[bench]"
	$(BENCH_PIP) install --quiet -c constraints.txt -e ".[bench,peers]" || echo "peer optimizers not installed: reported as skipped"
	touch $@

# The pretraining benchmark (default preset). Others: $(BENCH_PY) -m snsm.bench --preset smoke | finetune | family
bench: $(BENCH_VENV)/.installed
	$(BENCH_PY) -m snsm.bench

# Optimizer step time vs torch AdamW (fused and foreach), LLaMA-20M/60M shapes; writes results/speed/
speed: $(VENV)/.installed
	$(PY) -m snsm.bench.speed

# Peak memory of one training step, broken down (LLaMA 60M-1B, ordinary and in-backward steps); writes results/memory/
memory: $(VENV)/.installed
	$(PY) -m snsm.bench.memory

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist src/*.egg-info .pytest_cache
