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
	$(VENV)/bin/hlss demo-cohort $(DEMO_DIR)/slides --patients 12 --slides-per-patient 1-2
	$(VENV)/bin/hlss tile $(DEMO_DIR)/slides/manifest.csv --store $(DEMO_DIR)/cohort.zarr --workers 2
	$(VENV)/bin/hlss info $(DEMO_DIR)/cohort.zarr
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/hlss train --store $(DEMO_DIR)/cohort.zarr --out $(DEMO_DIR)/run --config configs/demo.yaml
	$(VENV)/bin/hlss extract --store $(DEMO_DIR)/cohort.zarr --checkpoint $(DEMO_DIR)/run --name hlss-demo
	@echo; echo "kNN of the demo encoder at initialisation (held-out patients of the manifest):"
	$(VENV)/bin/hlss knn --store $(DEMO_DIR)/cohort.zarr --checkpoint $(DEMO_DIR)/run --initial --k 20
	@echo; echo "kNN of the trained encoder (features from the store):"
	$(VENV)/bin/hlss knn --store $(DEMO_DIR)/cohort.zarr --features hlss-demo --k 20 --json $(DEMO_DIR)/knn.json
	@echo
	@echo "Results: store $(DEMO_DIR)/cohort.zarr (tiles, features/hlss-demo), run $(DEMO_DIR)/run, kNN $(DEMO_DIR)/knn.json"

test: setup test-data
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup test-data
	$(PY) benchmarks/tiling.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/hlss_vs_hidisc.py

clean:
	rm -rf $(DEMO_DIR) benchmarks/output .pytest_cache
