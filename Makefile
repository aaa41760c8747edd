# legal_batch — everything sets itself up from Python 3.11+ and the package registries.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export LEGAL_BATCH_HOME ?= $(CURDIR)/.legal_batch

.PHONY: install demo test bench dev lint db-stop clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "legal_batch needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/legal-batch demo run

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_embeddings --cases 10000 --ingest-lines 50000

dev: $(STAMP)
	DAGSTER_HOME="$$($(BIN)/legal-batch dagster-home)" $(BIN)/dagster dev -w workspace.yaml

lint: $(STAMP)
	$(BIN)/ruff check legal_batch legal_batch_tests benchmarks

db-stop: $(STAMP)
	$(BIN)/legal-batch db stop

clean: db-stop
	rm -rf $(VENV) .legal_batch
