# sdtune: `make setup` installs into .venv (idempotent), `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdtune-installed

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

# Reinstall only when the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

# Tests never download anything (tests/conftest.py also sets these).
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -m "not slow"

# The study in miniature, offline on a CPU in a few minutes (scripts/demo.sh; its header variables,
# e.g. DEMO_DIR or DEMO_STEPS, can be set on the command line or in the environment).
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" PYTHON="$(abspath $(PY))" bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
