# `make demo` and `make test` are the only set-up commands a fresh machine needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A stamp is newer than setup.py only after a successful install, so a second run installs nothing.
# The demo needs the package alone; the tests also need every optional feature they check (the
# test extra: Beam, keras-hub, ONNX, PyAV, ...), which took half of `make demo`'s install time.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install test test-fast demo ablation clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

# Two worker processes, one test file each at a time (module fixtures are built once); most of
# a tiny test's time is single-threaded Python and graph building, which a second process
# overlaps on the second core. Lists the 25 slowest tests at the end (the suite's time budget).
XDIST := -n 2 --dist loadfile
test: $(TEST_STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25 tests

# Skips the end-to-end tests marked `slow` (CI runs everything through `make test`).
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

demo: $(STAMP)
	$(PY) -m centermask_tf.cli demo --workdir work/demo

# The paper's Local Shape / Global Saliency experiment on an occluded shapes set: one model per
# mask mode, same schedule (about 15 minutes on 2 CPU cores). Reruns reuse finished runs.
OCCLUDED := work/shapes_occluded
ablation: $(STAMP)
	test -f $(OCCLUDED)/annotations/instances_val.json || \
		$(PY) -m centermask_tf.cli make-shapes --output $(OCCLUDED) --occlusion 0.7 --seed 1
	$(PY) -m centermask_tf.cli ablate --workdir work/ablation --train --config configs/shapes_tiny.yaml \
		--set data.train.annotations=$(OCCLUDED)/annotations/instances_train.json \
		--set data.train.images=$(OCCLUDED)/train \
		--set data.val.annotations=$(OCCLUDED)/annotations/instances_val.json \
		--set data.val.images=$(OCCLUDED)/val

clean:
	rm -rf work .pytest_cache
