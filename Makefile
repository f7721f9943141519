# Two entry points: `make demo` (set up + explain a real public scan) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= out/demo
# Tests and CI read the local mirror of the public scans when it is beside the checkout.
SHARED_DATA := $(abspath ../shared/data)
export INSTANCE_SALIENCY_DATA ?= $(if $(wildcard $(SHARED_DATA)/SHA256SUMS),$(SHARED_DATA),)

.PHONY: demo test venv clean cohort-example

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/instance-saliency demo --out $(DEMO_OUT) --overwrite

test: venv
	$(PY) -m pytest -q

# Regenerate docs/cohort_example (four public scans, shipped model; long on CPU).
# Options: make cohort-example COHORT_ARGS="--model DIR --device cuda"
cohort-example: venv
	$(PY) tools/cohort_example.py $(COHORT_ARGS)

clean:
	rm -rf $(VENV) out
