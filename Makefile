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

.PHONY: test test-main test-triton demo bench build clean gpu-check gpu-check-dry

# constraints.txt pins torch and torchvision for every install, so that no dependency (lightning, accelerate)
# can replace the pinned torch build.
CONSTRAINTS := -c constraints.txt

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(CONSTRAINTS) --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install --quiet $(CONSTRAINTS) $(TORCH_PKGS) ninja pybind11
	touch $(STAMP)

# Builds amp_fused._C (and amp_fused._C_cuda where nvcc is found) in place and installs the package editable.
build: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation $(CONSTRAINTS) -e '.[dev]'

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

# On a GPU machine, with its own python3 and nothing installed: build there, CUDA tests, stress, sanitizer,
# bandwidth, summary table last (tools/gpu_check.sh; about 8 minutes). gpu-check-dry: the same harness on CPU.
gpu-check:
	PYTHON="$(PYTHON)" bash tools/gpu_check.sh

gpu-check-dry:
	PYTHON="$(PY)" bash tools/gpu_check.sh --dry-run

# The suite against torch 2.13 (the CPU-only wheel: no Triton, and PyPI's torchvision does not import beside it, so
# those tests skip saying why), in a venv of its own; the Triton folder is not run. amp_fused is not installed
# there: the checkout's in-place binaries are .venv's (built for its torch), so amp_fused builds its extension
# for this torch on first use (the first command below), cached in the venv.
VENV213 := .venv-torch213
PY213 := $(VENV213)/bin/python
STAMP213 := $(VENV213)/.installed
TEST213_ENV := AMP_FUSED_BUILD_DIR=$(CURDIR)/$(VENV213)/amp_fused-build

.PHONY: test-torch213

$(STAMP213): pyproject.toml setup.py
	test -x $(PY213) || $(PYTHON) -m venv $(VENV213)
	echo "torch==2.13.0" > $(VENV213)/constraints.txt
	$(PY213) -m pip install --quiet -c $(VENV213)/constraints.txt --upgrade pip "setuptools>=64" wheel
	$(PY213) -m pip install --quiet -c $(VENV213)/constraints.txt torch==2.13.0 pytest hypothesis numpy \
		scikit-learn ninja pybind11 tqdm matplotlib
	touch $(STAMP213)

test-torch213: $(STAMP213)
	$(TEST213_ENV) $(PY213) -c "from amp_fused import _extension as e; assert e.cpu_error is None, e.cpu_error"
	$(TEST213_ENV) $(PY213) -m pytest tests -q
