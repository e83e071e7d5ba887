# make install: .venv with torch, torchvision and the rest, then builds smca_kernels._C
#               (C++ CPU always; CUDA when torch is a CUDA build and nvcc is found).
# make test:    install, then the test suite (Triton kernels under TRITON_INTERPRET=1 without a GPU)
#               and the wheel check (.ci/wheel: pip wheel, a fresh venv beside torch, run from elsewhere).
# make demo:    install, then the main job: make the built-in data set, train a small SMCA-DETR,
#               evaluate, draw predictions (python -m smca.demo).
# make bench:   install, then the operator benchmark (table, CSV and plot in benchmarks/results,
#               the committed tables; run by hand, the script writes to runs/bench).
# make convergence: install, then the convergence study, SMCA vs DETR (~40 min on 2 CPU cores).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# nvcc on PATH may be a wrapper script; torch wants the real toolkit folder.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
MAX_JOBS ?= 2
# Build the CUDA kernels wherever a toolkit is found (CI compiles them on every run); USE_CUDA=0 skips.
USE_CUDA ?= 1
FORCE_CUDA ?= $(if $(and $(CUDA_HOME),$(filter-out 0,$(USE_CUDA))),1,0)
export CUDA_HOME MAX_JOBS USE_CUDA FORCE_CUDA

EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: install test demo bench convergence clean

install: $(VENV)/.built-cuda$(FORCE_CUDA)

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built-cuda$(FORCE_CUDA): $(VENV)/.deps $(EXT_SOURCES)
	rm -f $(VENV)/.built-cuda*
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q tests
	bash .ci/wheel

demo: install
	$(PY) -m smca.demo

bench: install
	$(PY) benchmarks/bench_coattention.py --out benchmarks/results

convergence: install
	$(PY) benchmarks/convergence.py

clean:
	rm -rf build *.egg-info smca_kernels/_C*.so $(VENV)/.built-cuda*
