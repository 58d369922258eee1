# The two set-up commands: `make demo` (install + run the demo) and `make test` (install + run the tests).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PIP = $(VENV)/bin/pip
# CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS are read by setup.py when it builds mixq._C.
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install demo test lint clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]" --no-build-isolation
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mixq demo

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build mixq/_C*.so *.egg-info
