# Every target sets itself up: a fresh clone needs only python3 (>= 3.10).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: test bench speed venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# (Re)install when pyproject.toml or the constraints change.
# The tests run the benchmark's smoke preset, so both targets install the bench extras.
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Peers (GaLore, Adam-mini) are optional: the benchmark reports one that is missing as skipped.
$(VENV)/.installed-peers: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[peers]" || echo "peer optimizers not installed: reported as skipped"
	touch $@

bench: $(VENV)/.installed-peers
	$(PY) -m snsm.bench

# Optimizer step time vs torch AdamW (fused and foreach), LLaMA-20M/60M shapes; writes results/speed/
speed: $(VENV)/.installed
	$(PY) -m snsm.bench.speed

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
