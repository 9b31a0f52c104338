# FLEX: `make run` starts the platform locally, `make test` runs the whole suite.
# Both set up whatever is missing first: the virtualenv, npm packages and the database.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKING := $(PY) -m stack.backing

.PHONY: setup device-setup flower-setup browser run demo test lint format bench contracts clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FLEX needs Python 3.11+")'
	@echo "[flex] setting up the virtualenv in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

# A device host: only what `python -m worker` needs (no Django, web server or test tools).
device-setup: $(VENV)/.device-installed

$(VENV)/.device-installed: requirements-device.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FLEX needs Python 3.11+")'
	@echo "[flex] setting up a device's virtualenv in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements-device.txt
	@touch $@

# Flower's simulation, which the e2e benchmark compares the platform with (bench/flower.py): a
# virtualenv of its own, since Flower pins an older protobuf than FLEX's.
FLOWER_VENV := .venv-flower

flower-setup: $(FLOWER_VENV)/.installed

$(FLOWER_VENV)/.installed: requirements-flower.txt
	@echo "[flex] setting up Flower's simulation for the benchmarks in $(FLOWER_VENV)"
	@test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	@$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	@$(FLOWER_VENV)/bin/python -m pip install --quiet -r requirements-flower.txt
	@touch $@

node_modules/.installed: package.json package-lock.json
	@v=$$(node --version 2>/dev/null); major=$${v#v}; major=$${major%%.*}; \
	  if ! command -v npm >/dev/null 2>&1 || ! [ "$${major:-0}" -ge 18 ] 2>/dev/null; then \
	    echo "error: FLEX needs Node.js 18+ with npm (found: node $${v:-none}, npm $$(command -v npm || echo none))"; \
	    exit 1; fi
	@echo "[flex] installing the pinned solc and anvil from npm"
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Browser tests drive Debian's chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "[flex] installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get -q update >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends chromium >/dev/null; \
	  else echo "error: install chromium (Debian: apt-get install chromium)"; exit 1; fi; }

contracts: setup
	$(PY) -m chain.build

run: setup
	$(BACKING) -- $(PY) -m stack.devstack run

demo: setup
	$(BACKING) -- $(PY) -m stack.devstack demo $(DEMO_ARGS)

test: setup browser
	$(BACKING) --postgres -- $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup flower-setup
	$(BACKING) --postgres -- $(PY) -m bench $(PARTS)

clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis
