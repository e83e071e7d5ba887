# make install: .venv with torch, torchvision and the rest, then builds smca_kernels._C
#               (C++ CPU always; CUDA when torch is a CUDA build and nvcc is found).
# make test:    install, then the test suite (Triton kernels under TRITON_INTERPRET=1 without a GPU)
#               and the wheel check (.ci/wheel: pip wheel, a fresh venv beside torch, run from elsewhere).
# make demo:    install, then the main job: make the built-in data set, train a small SMCA-DETR,
#               evaluate, draw predictions (python -m smca.demo).
# make bench:   install, then the operator benchmark (table, CSV and plot in benchmarks/results,
#               the committed tables; run by hand, the script writes to runs/bench).
# make convergence: install, then the convergence study, SMCA vs DETR (~40 min on 2 CPU cores).
# make fuzz:    install, then the property-based fuzz of every kernel backend (tests/test_fuzz.py)
#               from a printed seed: FUZZ_EXAMPLES cases per backend (default 1000), FUZZ_SEED=S
#               repeats a run, FUZZ_ARGS more pytest arguments (e.g. FUZZ_ARGS="-k cpu").
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

.PHONY: install test demo bench convergence fuzz clean

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

FUZZ_EXAMPLES ?= 1000
ifndef FUZZ_SEED
FUZZ_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
fuzz: install
	@echo "fuzz seed $(FUZZ_SEED): make fuzz FUZZ_SEED=$(FUZZ_SEED) FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) repeats this run"
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py --hypothesis-seed=$(FUZZ_SEED) \
		--hypothesis-show-statistics $(FUZZ_ARGS)

clean:
	rm -rf build *.egg-info smca_kernels/_C*.so $(VENV)/.built-cuda*
