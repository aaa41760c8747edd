# legal_batch — everything sets itself up from Python 3.11+ and the package registries.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export LEGAL_BATCH_HOME ?= $(CURDIR)/.legal_batch

.PHONY: install demo demo-receipts test bench bench-scale dev ui-check lint db-stop clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "legal_batch needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/legal-batch demo run

# The receipt-line example: DynamoDB (moto's server, here) → batch embeddings → Chroma, statuses written back
demo-receipts: $(STAMP)
	$(BIN)/python -m legal_batch_tests.demos.receipt_lines

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_embeddings --cases 10000 --ingest-lines 50000

# the whole lifecycle, empty database → searchable, each stage against its limit; STORAGE=halfvec, COMPARE=1
CASES ?= 3000
STORAGE ?= vector
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.bench_scale --cases $(CASES) --storage $(STORAGE) $(if $(COMPARE),--compare-storage)

# `dg dev` (webserver + daemon) on the instance under $LEGAL_BATCH_HOME/dagster, started from there
# (see legal_batch/ui.py); PORT=3001 make dev for another port
dev: $(STAMP)
	$(BIN)/python -m legal_batch.ui $(if $(PORT),--port $(PORT))

# Screenshots of the UI on a demo instance, in a real headless Chromium (Debian's), under docs/
ui-check: $(STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/python -m legal_batch_tests.ui.screenshots --out docs

lint: $(STAMP)
	$(BIN)/ruff check legal_batch legal_batch_tests benchmarks

db-stop: $(STAMP)
	$(BIN)/legal-batch db stop

clean: db-stop
	rm -rf $(VENV) .legal_batch
