# The two commands of the README:  make demo   and   make test
# Both create .venv, install a CPU build of torch where no NVIDIA GPU is present, then the project.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Where no GPU is present pip takes the CPU wheel of this version when the machine offers one
# (e.g. a local wheel cache); elsewhere add e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=
DEMO_DIR ?= demo_data
# pytest-xdist processes for `make test`: whole test modules run side by side (tests/conftest.py orders them).
# Three on two cores, because the long modules spend much of their time waiting on Ray and subprocesses.
TEST_WORKERS ?= 3

.PHONY: setup demo ablate test fuzz bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_DIR)

# The paper's design claims (LRN, overlapping pooling, two columns, dropout, ReLU, input scale, LRN alpha)
# measured on the demo data at reduced width: docs/training.md, "Ablations". Rerunning resumes.
ablate: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/ablate.sh $(DEMO_DIR)

# One intra-op thread per test process: three processes on two cores gain nothing from more, and idle OpenMP
# threads spin. (Ray's workers and torchrun's ranks get one anyway.)
test: setup
	OMP_NUM_THREADS=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The property-based fuzz tests with many more examples than `make test` runs, from a random seed.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q tests -k fuzz

bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/shards.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/pipeline_bench.py --repeat 3
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/train.py

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
