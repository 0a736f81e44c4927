PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := examples/models
MODEL_FILE := $(MODELS)/iris/v1/model.joblib

.PHONY: venv model run test lint bench bench-tools bench-gateway bench-model-server bench-xds \
	images clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

model: $(MODEL_FILE)

$(MODEL_FILE): examples/train_iris.py | venv
	$(PY) examples/train_iris.py $(MODELS)

run: venv model
	$(VENV)/bin/infergate run examples/routing.yaml --repository $(MODELS)

test: venv model
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: bench-gateway bench-model-server bench-xds

bench-tools:
	@command -v wrk >/dev/null || apt-get install -y -qq wrk || sudo apt-get install -y -qq wrk

bench-gateway: venv model bench-tools
	$(PY) -m bench

bench-model-server: venv model bench-tools
	$(PY) -m bench.model_server

bench-xds: venv
	$(PY) -m bench.xds_scale

images: venv
	bash docker/build.sh

clean:
	rm -rf $(VENV) $(MODELS) run .pytest_cache
