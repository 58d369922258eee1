# The two set-up commands: `make demo` (install + run the demo) and `make test` (install + run the tests).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PIP = $(VENV)/bin/pip
# CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS are read by setup.py when it builds mixq._C.
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install demo test test-kernels-cpu lint clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]" --no-build-isolation
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mixq demo

# The suite on TEST_JOBS pytest-xdist workers (2: CI's cores); the slowest tests are listed at the end.
TEST_JOBS ?= 2
test: install
	$(VENV)/bin/python -m pytest -q -n $(TEST_JOBS) --durations=10

# The kernel tests on CPU: csrc/ built by g++ for the CUDA emulation of tools/cuda_emu (no GPU needed), with
# AddressSanitizer (an out-of-bounds access fails the run with a report in .venv/asan.*; ASAN=0 to skip it), spread
# over KERNEL_JOBS pytest-xdist workers (CPU-bound, one thread each: 2 halve CI's longest step on 2 cores).
ASAN ?= 1
KERNEL_JOBS ?= 2
ASAN_ENV = $(if $(filter 1,$(ASAN)),LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(VENV)/asan,)
test-kernels-cpu: install
	$(VENV)/bin/python tools/cuda_emu/build.py $(if $(filter 1,$(ASAN)),--asan,) > $(VENV)/cuda_emu.path
	rm -f $(VENV)/asan.*
	$(ASAN_ENV) MIXQ_CUDA_EMU="$$(cat $(VENV)/cuda_emu.path)" $(VENV)/bin/python -m pytest -q -m kernels \
		-n $(KERNEL_JOBS) -p no:cacheprovider --basetemp=$(VENV)/kernels-tmp --durations=15 \
		|| { cat $(VENV)/asan.* 2>/dev/null | head -40; exit 1; }

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build mixq/_C*.so *.egg-info
