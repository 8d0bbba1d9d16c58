# Two entry points on a fresh machine: `make quickstart` (the main job) and `make test`.
# Both create .venv and install the package on first use; nothing else is assumed installed.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: install quickstart test test-all clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/overlay quickstart

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest

clean-venv:
	rm -rf $(VENV)
