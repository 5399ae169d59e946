# make test  — create .venv if missing, install, build the extensions, run the whole suite
# make demo  — the same set-up, then a short AMP training run on scikit-learn's digits
# make bench — the benchmarks (not part of the tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
# No GPU on the build machines: give cpp_extension an arch to build for (PTX runs on newer GPUs too).
TORCH_CUDA_ARCH_LIST ?= 9.0+PTX
export TORCH_CUDA_ARCH_LIST

.PHONY: test test-main test-triton demo bench build clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install --quiet $(TORCH_PKGS) ninja pybind11
	touch $(STAMP)

# Builds amp_fused._C (and amp_fused._C_cuda where nvcc is found) in place and installs the package editable.
build: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'

test: build
	$(MAKE) test-main test-triton

test-main:
	$(PY) -m pytest tests -q

test-triton:
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton -q

demo: build
	$(PY) -m bench.demo

bench: build
	$(PY) -m bench

clean:
	rm -rf build amp_fused/*.so *.egg-info
