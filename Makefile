# Quick start: `make demo` and `make test` each build .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that imports together here (see README, "Installing")
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-output
PYTEST_ARGS ?=

.PHONY: setup demo test test-data test-browser bench clean

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
	$(VENV)/bin/hlss run $(DEMO_DIR)/cohort.zarr --config configs/demo-flows.yaml --source $(DEMO_DIR)/slides/manifest.csv \
		--run-dir $(DEMO_DIR)/run
	$(VENV)/bin/hlss info $(DEMO_DIR)/cohort.zarr
	@echo; echo "kNN of the demo encoder at initialisation (held-out patients of the manifest), for comparison:"
	$(VENV)/bin/hlss knn $(DEMO_DIR)/cohort.zarr --checkpoint $(DEMO_DIR)/run --initial --k 20
	@echo; echo "Attribute maps of the first slide, then the cohort report with them:"
	$(VENV)/bin/hlss explain $(DEMO_DIR)/cohort.zarr --checkpoint $(DEMO_DIR)/run \
		--slide $$(sed -n 2p $(DEMO_DIR)/slides/manifest.csv | cut -d, -f3) --out $(DEMO_DIR)/explain
	$(VENV)/bin/hlss report $(DEMO_DIR)/cohort.zarr --out $(DEMO_DIR)/report.html
	@echo
	@echo "Results: store $(DEMO_DIR)/cohort.zarr (tiles, features/hlss-demo, evaluations/knn-hlss-demo), run $(DEMO_DIR)/run,"
	@echo "report $(DEMO_DIR)/report.html (open it in a browser), heatmaps in $(DEMO_DIR)/explain."
	@echo "Run 'make demo' again: unchanged slides are neither tiled nor extracted, and the finished run is reused."

# the browser tests drive a headless Chromium: installed here when missing (see the script)
test-browser:
	sh tests/ensure_browser.sh

test: setup test-data test-browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup test-data
	$(PY) benchmarks/tiling.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/hlss_vs_hidisc.py

clean:
	rm -rf $(DEMO_DIR) benchmarks/output .pytest_cache
