# vl2lab — two commands do everything on a fresh machine with Python 3.10+ (install included):
#   make run    executes the whole workbook with papermill (CPU defaults) into runs/<time>/ with a report
#   make test   pytest + nbval (the committed notebooks' checked cells)
# Other targets: make lab (JupyterLab), make refresh (re-executes the notebooks in place: their stored
# outputs are nbval's reference), make env (just the environment), make clean.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu
NB ?=
PINS := $(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
STAMP := $(VENV)/.pins-$(PINS)
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: env run test test-py test-nb lab refresh clean

env: $(STAMP)

# The environment is rebuilt only when requirements.txt or pyproject.toml change.
# torch is pinned exactly (==): pip takes the CPU build kept on disk; a range would pull a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	@echo "[vl2lab] creating $(VENV) (pins $(PINS))"
	@rm -rf $(VENV)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vl2lab needs Python 3.10 or newer"'
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || true
	@$(PY) -m pip install -q -r requirements.txt >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(PY) -m pip install -q --no-deps -e . >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vl2lab)" >/dev/null
	@touch $@
	@echo "[vl2lab] environment ready"

run: env
	$(PY) -m vl2lab.workbook run --profile $(PROFILE) $(if $(NB),--only $(NB))

test: env test-py test-nb

test-py: env
	$(PY) -m pytest -q tests

# Notebooks whose stored outputs nbval compares (all of them; override to check a few).
NBVAL_NOTEBOOKS ?= $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

test-nb: env
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout 900 $(NBVAL_NOTEBOOKS)

refresh: env
	$(PY) -m vl2lab.workbook refresh $(if $(NB),--only $(NB))

lab: env
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf runs .pytest_cache
