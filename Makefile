# Two commands: `make demo` (set up, then the embedded default run) and `make test` (set up, then tests).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1

.PHONY: setup demo smoke test benchmark clean

$(BIN)/avrec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CUDA build on this machine's disk is the one with a working torchvision (NOTES.md 1).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/avrec

setup: $(BIN)/avrec

demo: setup
	$(BIN)/avrec simulate --out runs/demo

smoke: setup
	$(BIN)/avrec simulate --config configs/smoke.toml --out runs/smoke

test: setup
	$(BIN)/python -m pytest -q

benchmark: setup
	$(BIN)/python -m simulations.benchmark_ml100k

clean:
	rm -rf runs .pytest_cache
