# Quick start: `make demo` and `make test` each build .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that imports together here (see README, "Installing")
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-output
PYTEST_ARGS ?=

.PHONY: setup demo test test-data bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

test-data: setup
	$(PY) tests/fetch_data.py

demo: setup
	$(VENV)/bin/hlss demo-cohort $(DEMO_DIR)/slides
	$(VENV)/bin/hlss tile $(DEMO_DIR)/slides/manifest.csv --store $(DEMO_DIR)/cohort.zarr --workers 2
	$(VENV)/bin/hlss info $(DEMO_DIR)/cohort.zarr
	@echo
	@echo "Results: store $(DEMO_DIR)/cohort.zarr (tiles, coords, tissue, thumbnails), slides in $(DEMO_DIR)/slides"

test: setup test-data
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup test-data
	$(PY) benchmarks/tiling.py
	$(PY) benchmarks/compression.py

clean:
	rm -rf $(DEMO_DIR) benchmarks/output .pytest_cache
