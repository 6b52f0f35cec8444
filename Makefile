# vqhps — two commands: `make test` and `make reproduce`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.vqhps-setup
NPROC ?= 1
# full on a CUDA machine, smoke elsewhere (override: make reproduce PROFILE=smoke)
PROFILE ?= $(shell $(PYTHON) -c "import torch; print('full' if torch.cuda.is_available() else 'smoke')" 2>/dev/null || echo smoke)
# full on one GPU: the trainings run as background jobs beside the notebooks (OVERLAP= turns it off)
# study-wide config overrides, e.g. make reproduce SET="vqhps.backbone=resnet50"
SET ?=
# where the data comes from: synthetic (embedded) or paper (SMPL + AMASS + 3DPW, see README)
SOURCE ?= synthetic
OVERLAP ?= $(if $(and $(filter full,$(PROFILE)),$(filter 1,$(NPROC))),--overlap)

.PHONY: setup system-libs test unit-test notebook-test reproduce bench clean

# with SOURCE=paper, setup-body checks the paper's files first and stops with the list of problems
setup: $(STAMP)
	@$(PYTHON) -m vqhps setup-body $(if $(filter-out synthetic,$(SOURCE)),--set data.source=$(SOURCE))

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@$(MAKE) --no-print-directory system-libs
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# Headless OpenGL: EGL (NVIDIA or Mesa) or OSMesa, from Debian's packages when missing.
GL_PACKAGES := libegl1 libgl1 libopengl0 libglvnd0 libglx0 libegl-mesa0 libgl1-mesa-dri libglu1-mesa libosmesa6
system-libs:
	@if ldconfig -p | grep -q libOSMesa && ldconfig -p | grep -q 'libEGL\.so'; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing OpenGL libraries: $(GL_PACKAGES)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(GL_PACKAGES)) >/dev/null \
			|| echo "warning: apt-get failed; rendering falls back to whatever OpenGL is present"; \
	else \
		echo "missing OpenGL libraries; run: sudo apt-get install -y $(GL_PACKAGES)"; \
	fi

test: setup unit-test notebook-test

# one pytest-xdist worker per core by default; a test file stays on one worker (its fixtures run once)
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
unit-test: setup
	$(PYTHON) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile tests

notebook-test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=12 --nbval-lax --nbval-current-env notebooks/

reproduce: setup
	@echo "make reproduce: profile $(PROFILE), $(SOURCE) data, $(NPROC) process(es) $(OVERLAP)"
	$(PYTHON) -m vqhps reproduce --profile $(PROFILE) --nproc $(NPROC) $(OVERLAP) $(if $(filter-out synthetic,$(SOURCE)),--set data.source=$(SOURCE)) $(foreach s,$(SET),--set $(s))

bench: setup
	$(PYTHON) -m vqhps bench --profile $(PROFILE)

clean:
	rm -rf results/smoke data/smoke .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
