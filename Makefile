PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := examples/models
MODEL_FILE := $(MODELS)/iris/v1/model.joblib

.PHONY: venv model run test lint bench bench-tools bench-gateway bench-model-server bench-xds \
	bench-telemetry bench-api \
	images clean

venv: $(VENV)/.installed

# Running needs the runtime dependencies only; tests and benchmarks add their extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-%: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

model: $(MODEL_FILE)

$(MODEL_FILE): examples/train_iris.py | venv
	$(PY) examples/train_iris.py $(MODELS)

run: venv model
	$(VENV)/bin/infergate run examples/routing.yaml --repository $(MODELS)

# Four workers (pytest-xdist), two per core: an end-to-end test waits on Envoy, timers and
# its processes about half of its time. Each picks ports from its own share
# (tests/conftest.py). TEST_WORKERS=0 runs in one process. Bytecode is cached even where the
# environment sets PYTHONDONTWRITEBYTECODE: the suite starts about 250 Python processes, and
# each would compile our modules again (0.12 s of CPU). The 15 slowest tests are listed.
TEST_WORKERS ?= 4
test: $(VENV)/.installed-test model
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

bench: bench-gateway bench-model-server bench-xds bench-telemetry bench-api

bench-tools:
	@command -v wrk >/dev/null || apt-get install -y -qq wrk || sudo apt-get install -y -qq wrk

bench-gateway: $(VENV)/.installed-bench model bench-tools
	$(PY) -m bench

bench-model-server: $(VENV)/.installed-bench model bench-tools
	$(PY) -m bench.model_server

bench-xds: $(VENV)/.installed-bench
	$(PY) -m bench.xds_scale

bench-telemetry: venv model bench-tools
	$(PY) -m bench.telemetry

bench-api: venv model bench-tools
	$(PY) -m bench.api_overhead
	$(PY) -m bench.plain_chain

images: venv
	bash docker/build.sh

clean:
	rm -rf $(VENV) $(MODELS) run .pytest_cache
