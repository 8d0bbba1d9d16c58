# Two entry points on a fresh machine: `make quickstart` (the main job) and `make test`.
# Both create .venv and install the package on first use; nothing else is assumed installed.
VENV ?= .venv
PYTHON ?= python3
# torch goes in first, on its own: the CPU build by default, from PyTorch's CPU wheel index (PyPI's default Linux
# build is the CUDA one, several GB more). CUDA: `make TORCH_INDEX=https://download.pytorch.org/whl/cu128 …` (any
# index from pytorch.org/get-started), or `TORCH_INDEX=` for PyPI's default build. When pip's find-links
# (PIP_FIND_LINKS or `pip config`: an offline wheel folder) hold the CPU wheel, it comes from there, no index asked.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(TORCH_CPU_INDEX)
FIND_LINKS = $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LOCAL_TORCH = $(strip $(if $(filter $(TORCH_CPU_INDEX),$(TORCH_INDEX)),\
  $(firstword $(wildcard $(addsuffix /torch-$(TORCH_VERSION)+cpu-*.whl,$(FIND_LINKS))))))
TORCH_SPEC ?= torch==$(TORCH_VERSION)$(if $(LOCAL_TORCH),+cpu)
TORCH_FROM ?= $(if $(LOCAL_TORCH),--find-links $(dir $(LOCAL_TORCH)),$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
STAMP := $(VENV)/.installed-stamp
# The full Langflow server (the [langflow] extra) does not resolve with pip: uv installs it into its own venv,
# used by the `langflow`-marked test (tests/test_langflow_server.py) through OVERLAY_LANGFLOW_BIN.
LANGFLOW_VENV ?= .venv-langflow
LANGFLOW_STAMP := $(LANGFLOW_VENV)/.installed-stamp

.PHONY: install install-langflow quickstart test test-all clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)" $(TORCH_FROM)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(LANGFLOW_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LANGFLOW_VENV)
	$(LANGFLOW_VENV)/bin/pip install --quiet uv
	$(LANGFLOW_VENV)/bin/uv pip install --quiet --python $(LANGFLOW_VENV)/bin/python "$(TORCH_SPEC)" $(TORCH_FROM)
	$(LANGFLOW_VENV)/bin/uv pip install --quiet --python $(LANGFLOW_VENV)/bin/python -e ".[langflow,test]"
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
