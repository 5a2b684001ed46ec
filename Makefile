# The two commands of the README: `make quickstart` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): the tests start real multi-process runs whose start-up (imports)
# and gloo waits leave cores idle in a serial run. Which tests share a worker, and in what order
# they go: tests/conftest.py.
TEST_WORKERS ?= 2

.PHONY: install test quickstart bench lint clean

install: $(STAMP)

$(STAMP): setup.py scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

quickstart: install
	$(PY) tools/quickstart.py --workdir runs/quickstart

bench: install
	$(PY) bench/loop_overhead.py
	$(PY) bench/train_throughput.py
	$(PY) bench/preprocess_throughput.py

lint: install
	$(PY) -m ruff check megatron_loopmdm tests bench tools pretrain_loopmdm.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
