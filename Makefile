# `make demo` / `make test` create .venv when it is missing, install diffpolicy with what it
# needs, then run the main job / the test suite.
#
# torch: a torch already importable by $(PYTHON) (e.g. a user's CUDA build) is kept: the venv
# then sees it through --system-site-packages. Otherwise torch==$(TORCH_VERSION) is installed:
# the CPU wheel where pip finds one locally (our CI machines), or from TORCH_INDEX_URL. Either
# way the installed torch is written to a constraints file, so resolving the other dependencies
# can never replace it with a different (multi-GB CUDA) build.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# e.g. https://download.pytorch.org/whl/cpu for the CPU build where pip would pick a CUDA one
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffpolicy-installed
PYTEST_ARGS ?=

.PHONY: lint install demo demo-toy test bench clean

install: $(STAMP)

$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "Using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): pyproject.toml $(PY)
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffpolicy demo

demo-toy: $(STAMP)
	$(VENV)/bin/diffpolicy toy-demo

test: $(STAMP) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check diffpolicy agents envs benchmarks tests

bench: $(STAMP)
	$(PY) benchmarks/sampler_speed.py --json benchmarks/results/sampler_speed.json

clean:
	rm -rf $(VENV) build *.egg-info
