# `make demo` and `make test` are the only set-up commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is newer than setup.py only after a successful install, so a second run installs nothing.
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Skips the end-to-end tests marked `slow` (CI runs everything through `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m centermask_tf.cli demo --workdir work/demo

clean:
	rm -rf work .pytest_cache
