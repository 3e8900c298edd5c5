# Two commands do all the set-up on a fresh machine (see README):
#   make demo   creates .venv, installs, screens edited copies of real photos, trains, reports
#   make test   creates/updates .venv, starts Redis/PostgreSQL when down, runs lint, types, tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit services browsers compose monitoring-tools clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes. torch/torchvision are pinned in pyproject; on this
# project's machines pip takes them from local disk.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/moderation demo

services:
	bash scripts/services.sh

browsers:
	bash scripts/browsers.sh

compose:
	bash scripts/compose.sh

monitoring-tools:
	bash scripts/monitoring_tools.sh

lint: venv
	$(PY) -m ruff check moderation workers admin tests
	$(PY) -m ruff format --check moderation workers admin tests
	$(VENV)/bin/lint-imports

typecheck: venv
	$(PY) -m mypy moderation workers admin

test: venv services browsers compose monitoring-tools lint typecheck
	$(PY) -m pytest

unit: venv
	$(PY) -m pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
