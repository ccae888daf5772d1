# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv and install the project with its test extras, pinned to the
# tested set in constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean browser viewer

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-pipeline run pipelines/demo.yaml

# `make test` = the static checks (`make lint`), then the tests.
test: lint browser viewer
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy wsi_pipeline

# Chromium for the page tests (report, viewer), from the Debian registry; only when missing and
# when root (otherwise those tests skip, saying why).
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || true

# OpenSeadragon for `wsi-pipeline view`, from the npm registry into node_modules/ (package.json);
# skipped quietly without npm (the viewer then says how to install it).
viewer:
	@test -f node_modules/openseadragon/build/openseadragon/openseadragon.min.js || \
	  { command -v npm >/dev/null && npm install --no-audit --no-fund --silent; } || true

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out bench-out
