# Every target sets up what it needs: a fresh clone only needs python3 (>= 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install install-demo system-deps demo test test-fast clean

# Debian data the tests and benchmarks read (the real-image label-efficiency test): installed
# when missing, so a fresh machine needs nothing by hand. Needs root (CI runs as root).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
system-deps:
	@if [ ! -f $(FASHION_MNIST) ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

# The demo's environment: the package, TensorFlow (the embedding stage) and matplotlib (the
# report), not the test and deployment extras (Airflow, dask, gcp: gigabytes).
$(VENV)/.installed-demo: setup.py $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

# Everything the tests exercise (every runner, the deploy files, the references).
$(VENV)/.installed: setup.py $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-demo

install-demo: $(VENV)/.installed-demo
install: $(VENV)/.installed

# The main job on an embedded default: a demo image pool and model generated locally, the
# nightly job (embed, cluster, select, report) on the DirectRunner's engine. Rerunning reuses
# the pool, model, embeddings and clusters, and recomputes today's batch.
demo: install-demo
	$(PY) -m pipelines.nightly --demo --work_dir demo_output/work --replace_batch

# The whole test suite (what CI runs: .ci/run).
test: install system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The suite without the tests marked slow (full pipelines with TensorFlow, multi-worker
# runners, deploy dry runs, the label-efficiency loop): about a minute.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) demo_output
