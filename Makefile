# Two commands a fresh machine needs: `make demo` and `make test` (Python 3.11 and make only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS ?= constraints/ci.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

.PHONY: demo test test-hf4 bench install clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m wavefront.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

# The Hugging Face tests under transformers 4.51.3 (the version the published ARMT code pins).
test-hf4:
	$(MAKE) VENV=.venv-hf4 CONSTRAINTS=constraints/hf4.txt install
	.venv-hf4/bin/python -m pytest -q -p no:cacheprovider -m hf

bench: $(STAMP)
	$(PY) benchmarks/executor_overhead.py

clean:
	rm -rf $(VENV) .venv-hf4 *.egg-info
