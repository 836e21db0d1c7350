# Alephant Gateway. `make run` starts the local stack; `make test` runs the test suite.
# Both install everything they need first: a pinned uv in .tools/, then the locked deps in .venv/.

PYTHON ?= python3
UV_VERSION := 0.9.7
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced
PYTEST_ARGS ?=
WORKERS ?= 1

export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: install run cluster test test-faults test-browser test-agents test-all lint fmt bench clean help

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@echo "==> bootstrapping uv $(UV_VERSION) into $(TOOLS)/"
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(STAMP): $(UV) pyproject.toml uv.lock
	@echo "==> installing locked dependencies into $(VENV)/"
	@$(UV) sync --frozen --all-groups
	@touch $(STAMP)

install: $(STAMP) ## Install uv and every locked dependency

run: install ## Start the whole local stack with a demo workspace and key (Ctrl-C stops it)
	@$(VENV)/bin/alephant dev --workers $(WORKERS)

cluster: install ## Start the multi-node stack: 3 NATS (R3), 2 control planes, 4 workers, 2 projectors
	@$(VENV)/bin/alephant dev --cluster

test: install ## Lint, type-check and run the test suite (slow tests only with SLOW=1; fault suite: make test-faults)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/pytest $(if $(SLOW),-m "not fault and not browser and not agent_cli",-m "not slow and not fault and not browser and not agent_cli") $(PYTEST_ARGS)

test-browser: install ## The console in headless Chromium (Playwright); screenshots in .alephant/artifacts/console/
	@$(VENV)/bin/pytest -m browser tests/browser $(PYTEST_ARGS)

test-agents: install ## Real agent CLIs (Claude Code) through the gateway, installed from npm
	@$(VENV)/bin/pytest -m agent_cli tests/agents $(PYTEST_ARGS)

FAULT_TIMEOUT ?= 300
test-faults: install ## The fault suite on the multi-node stack (kill, pause, partition); prints each fault's figures
	@$(VENV)/bin/pytest -m fault --timeout=$(FAULT_TIMEOUT) -rA $(PYTEST_ARGS)

lint: install ## ruff and mypy --strict
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check . || true
	@$(VENV)/bin/mypy

fmt: install ## Format and autofix
	@$(VENV)/bin/ruff check --fix .
	@$(VENV)/bin/ruff format .

bench: install ## Gateway (plain and fully governed) vs. the fake upstream called directly, same run; prints ratios
	@$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)

clean: ## Remove the venv, tools and local state
	rm -rf $(VENV) $(TOOLS) .alephant .pytest_cache .mypy_cache .ruff_cache
