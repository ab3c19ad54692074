# protloc: two entry points, both self-installing into .venv.
#   make demo   -- build the reference world and run both papers' main results on it -> runs/demo/report/
#   make test   -- lint + the test suite
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# (any CUDA build of torch works; the default below is the CPU wheel).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.protloc-installed

.PHONY: demo test install lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so the dependency range below never pulls a CUDA build.
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	@touch $@

install: $(STAMP)

# make demo: shipped weights (a few minutes); make demo TRAIN=1: train all four models first (about an hour
# on 2 CPU cores; TRAIN_SCALE=0.2 shortens every schedule).
TRAIN ?=
TRAIN_SCALE ?= 1.0

demo: $(STAMP)
	$(VENV)/bin/protloc demo --out $(DEMO_OUT) $(if $(TRAIN),--train --train-scale $(TRAIN_SCALE))

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks

test: lint
	$(VENV)/bin/python -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)
