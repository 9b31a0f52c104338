# FLEX: `make run` starts the platform locally, `make test` runs the whole suite.
# Both set up whatever is missing first: the virtualenv, npm packages and the database.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKING := $(PY) -m flexsite.backing

.PHONY: setup run test lint format bench contracts clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FLEX needs Python 3.11+")'
	@echo "[flex] setting up the virtualenv in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

node_modules/.installed: package.json package-lock.json
	@echo "[flex] installing the pinned solc and anvil from npm"
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $@

contracts: setup
	$(PY) -m chain.build

run: setup
	$(PY) manage.py migrate --no-input -v 0
	$(BACKING) -- $(PY) manage.py devchain

test: setup
	$(BACKING) --postgres -- $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(BACKING) -- $(PY) -m bench

clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis
