# Two commands matter: `make demo` and `make test`. Everything else is what they use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := deploy/kafka/kafka.sh

.PHONY: install demo test unit integration faults lint typecheck schemas bench kafka-start kafka-stop clean validate-deploy

# Idempotent: the venv is rebuilt only when pyproject.toml changes; pip's cache serves wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)
	bash $(KAFKA) fetch

demo: install
	bash examples/sentiment/demo.sh

test: install lint typecheck validate-deploy
	$(BIN)/pytest -q -ra --durations=15

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q -ra tests/integration

faults: install
	$(BIN)/pytest -q -ra tests/faults

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Offline: Kubernetes/KEDA schemas, compose-spec, Dockerfile rules, dashboard metric names.
validate-deploy: $(STAMP)
	$(BIN)/python deploy/validate.py

# The exported schemas must match the models; `make schemas` rewrites them.
schemas: $(STAMP)
	$(BIN)/llm-consumer schemas --out schemas

bench: install
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/client_overhead.py

kafka-start: install
	bash $(KAFKA) start

kafka-stop:
	bash $(KAFKA) stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
