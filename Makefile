# Every target sets up what it needs: a fresh clone only needs python3 (>= 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install system-deps demo test clean

# Debian data the tests and benchmarks read (the real-image label-efficiency test): installed
# when missing, so a fresh machine needs nothing by hand. Needs root (CI runs as root).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
system-deps:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job on an embedded default: a demo image pool and model generated locally, the
# nightly job (embed, cluster, select, report) on the DirectRunner's engine. Rerunning reuses
# the pool, model, embeddings and clusters, and recomputes today's batch.
demo: install
	$(PY) -m pipelines.nightly --demo --work_dir demo_output/work --replace_batch

# The test suite (what CI runs).
test: install system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) demo_output
