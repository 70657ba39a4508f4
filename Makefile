# Thin aliases; see README.md. PYTHON must be 3.11 or newer.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLIENT := .cache/studioml-client

.PHONY: venv demo test unit lint format bench studioml-client clean

venv: $(BIN)/studio-agent

$(BIN)/studio-agent: pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The real StudioML 0.0.49 client, in a venv of its own: the submitter in tests and benchmarks.
studioml-client: $(CLIENT)/bin/studio-run

$(CLIENT)/bin/studio-run:
	$(PYTHON) -m venv $(CLIENT)
	$(CLIENT)/bin/pip install --quiet --disable-pip-version-check studioml==0.0.49 'urllib3<2' 'requests-toolbelt<1'

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" packaging/demo.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

unit: venv
	$(BIN)/python -m pytest -m "not integration"

# pytest exits 5 when it collected nothing: say so, and fail.
test: lint studioml-client
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; exit $$rc

bench: venv studioml-client
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) $(CLIENT) .demo
