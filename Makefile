# Two entry points on a fresh machine: `make quickstart` (the main job) and `make test`.
# Both create .venv and install the package on first use; nothing else is assumed installed.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
# The full Langflow server (the [langflow] extra) does not resolve with pip: uv installs it into its own venv,
# used by the `langflow`-marked test (tests/test_langflow_server.py) through OVERLAY_LANGFLOW_BIN.
LANGFLOW_VENV ?= .venv-langflow
LANGFLOW_STAMP := $(LANGFLOW_VENV)/.installed-stamp
LANGFLOW_TORCH ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*),torch==2.13.0+cpu --find-links /opt/wheels,$(TORCH_SPEC))

.PHONY: install install-langflow quickstart test test-all clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(LANGFLOW_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LANGFLOW_VENV)
	$(LANGFLOW_VENV)/bin/pip install --quiet uv
	$(LANGFLOW_VENV)/bin/uv pip install --quiet --python $(LANGFLOW_VENV)/bin/python $(LANGFLOW_TORCH) -e ".[langflow,test]"
	touch $(LANGFLOW_STAMP)

install-langflow: $(LANGFLOW_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/overlay quickstart

test: $(STAMP) $(LANGFLOW_STAMP)
	OVERLAY_LANGFLOW_BIN=$(abspath $(LANGFLOW_VENV))/bin/langflow $(VENV)/bin/python -m pytest -m "not slow"

test-all: $(STAMP) $(LANGFLOW_STAMP)
	OVERLAY_LANGFLOW_BIN=$(abspath $(LANGFLOW_VENV))/bin/langflow $(VENV)/bin/python -m pytest

clean-venv:
	rm -rf $(VENV) $(LANGFLOW_VENV)
