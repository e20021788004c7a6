# cellstage — two commands: `make demo` runs the whole pipeline on the embedded demo,
# `make test` runs the tests. Both set up a project-local virtual environment first.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --printshellcmds
PYTEST_ARGS ?=

.PHONY: check demo demo-aml demo-aml-data test test-fast test-slurm test-kill bench lint report clean-results help setup setup-bioformats setup-env-twins demo-data tables setup-chromium

help:
	@echo "make demo        set up, generate the demo slides, run the whole workflow"
	@echo "make demo-aml    the AML pipeline (seed 003) alone on the smear demo (config/aml-demo.yaml; make demo runs it too)"
	@echo "make test        set up, run the test suite (unit + integration)"
	@echo "make test-fast   unit tests only"
	@echo "make test-kill   SIGKILL at KILL_POINTS (10) random points of a tiny run, rerun, same tables (tests/integration/test_kill.py)"
	@echo "make bench       benchmarks -> results/bench/*.json"
	@echo "make check       import-linter layer contract, ruff, snakefmt (run by make test)"
	@echo "make lint        make check + snakemake --lint"
	@echo "make report      snakemake --report results/report.html"
	@echo "make tables      rebuild every table and figure of results/report/ from stored outputs (no training)"
	@echo "make setup-bioformats  the optional Bio-Formats reader env in .venv-bioformats (numpy<2, Java)"
	@echo "make setup-env-twins   pip twins of workflow/envs/{io,seg,ml,report}.yaml in .venv-envs/ (tests/integration/test_envs.py)"

setup: $(VENV)/.installed

# The pins in requirements.txt are the tested stack (see ../shared/notes/machine-facts.md):
# torch and torchvision are pinned together in the same install, otherwise timm/lightly pull a
# torch whose torchvision fails to import. requirements.lock is the full resolved set.
$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -c "import torch, torchvision, timm, lightly, lightning, cellpose, openslide, zarr, snakemake"
	touch $@

# The optional Bio-Formats reader (backend "bioformats") in its own environment: python-javabridge
# builds only against numpy<2 and needs a JDK. Pins: the `==` lines of workflow/envs/bioformats.yaml
# (the conda twin of this venv), everything they pull in constrained by requirements.lock except
# the packages pinned there. JAVA_HOME is found from javac for the javabridge build.
# Measured on 2 cores: 70 s with a warm pip cache, 2 min cold (javabridge compiled from its sdist).
BF_VENV := .venv-bioformats
BF_ENV := workflow/envs/bioformats.yaml

# $(call env-pins,ENV_YAML,VENV): VENV/requirements.txt = the `name==version` lines of the env's
# pip section; VENV/constraints.txt = requirements.lock without those names (so what they pull in
# is the tested version, and a pin that differs from the lock on purpose still wins).
define env-pins
sed -n 's/^ *- \([A-Za-z0-9_.-]*==[^ #]*\).*/\1/p' $(1) > $(2)/requirements.txt
names="$$(sed 's/==.*//' $(2)/requirements.txt | tr 'A-Z_' 'a-z-' | paste -sd'|')"; \
	  tr 'A-Z_' 'a-z-' < requirements.lock | grep -v -E "^($$names)==" > $(2)/constraints.txt
endef

setup-bioformats: $(BF_VENV)/.installed

$(BF_VENV)/.installed: $(BF_ENV) requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	@command -v javac >/dev/null || [ -x "$${JAVA_HOME:-/nonexistent}/bin/javac" ] || { \
	  echo "error: no JDK (javac) found: install one (Debian: apt-get install default-jdk-headless) or set JAVA_HOME"; exit 1; }
	test -x $(BF_VENV)/bin/python || $(PYTHON) -m venv $(BF_VENV)
	$(BF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(call env-pins,$(BF_ENV),$(BF_VENV))
	export JAVA_HOME="$${JAVA_HOME:-$$(dirname "$$(dirname "$$(readlink -f "$$(command -v javac)")")")}"; \
	  $(BF_VENV)/bin/python -m pip install --quiet -r $(BF_VENV)/requirements.txt -c $(BF_VENV)/constraints.txt
	$(BF_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(BF_VENV)/bin/python -c "import numpy, javabridge, bioformats, cellstage.cli, cellstage.io.stage, cellstage.io.slides.bioformats; assert numpy.__version__.startswith('1.26'), numpy.__version__"
	touch $@

# Twins of the per-rule conda environments (workflow/envs/*.yaml; bioformats.yaml's twin is
# .venv-bioformats above): a plain venv per env holding exactly the env's pip section, built the
# same way, WITHOUT cellstage (the conda envs do not install it either: the rule scripts import it
# from the repository's src/, see docs/hpc.md). tests/integration/test_envs.py runs the rule
# scripts in them, so a module missing from an env fails here, not on a cluster. A changed yaml
# rebuilds its twin from scratch (a package dropped from the yaml must not linger in the twin).
# Measured on 2 cores under load 5-8 (pip from the local wheel store): io 90-143 s, report
# 102-134 s, seg 262-290 s, ml 148-362 s; 15 GB on disk (seg and ml hold torch, 6+ GB each).
ENV_TWINS := io seg ml report
TWIN_DIR := .venv-envs

setup-env-twins: $(foreach e,$(ENV_TWINS),$(TWIN_DIR)/$(e)/.installed)

$(TWIN_DIR)/%/.installed: workflow/envs/%.yaml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	rm -rf $(TWIN_DIR)/$*
	$(PYTHON) -m venv $(TWIN_DIR)/$*
	$(TWIN_DIR)/$*/bin/python -m pip install --quiet --upgrade pip
	$(call env-pins,workflow/envs/$*.yaml,$(TWIN_DIR)/$*)
	$(TWIN_DIR)/$*/bin/python -m pip install --quiet -r $(TWIN_DIR)/$*/requirements.txt -c $(TWIN_DIR)/$*/constraints.txt
	touch $@

demo-data: setup
	$(BIN)/python -m cellstage.demo resources/demo --preset demo --seed 0

demo: setup demo-data
	time $(SNAKEMAKE)
	$(SNAKEMAKE) --report results/report.html
	$(MAKE) demo-aml
	@echo "done: see results/report/, results/report.html, results/aml/report/ and results/aml/report.html"

# The AML paper's pipeline (seed 003) on the smear demo: Levels One to Three, MIL, its tables
demo-aml-data: setup
	$(BIN)/python -m cellstage.demo resources/smear --preset smear --seed 0

demo-aml: setup demo-aml-data
	time $(SNAKEMAKE) --configfile config/aml-demo.yaml
	$(SNAKEMAKE) --configfile config/aml-demo.yaml --report results/aml/report.html

report: setup
	$(SNAKEMAKE) --report results/report.html

# Every paper table and figure (results/report/: Table 1, A.5-A.7, Figs 4-7, confusion matrices,
# provenance.json) rebuilt from the stored fold outputs: only rule report may run (--allowed-rules),
# so nothing trains; a missing fold output is an error, never a training job.
tables: setup
	$(BIN)/snakemake --cores 1 --allowed-rules report --forcerun report -- results/report/summary.json

# headless Chromium for tests/integration/test_html_report.py (the snakemake --report HTML as a
# reader sees it): installed from Debian when running as root, else that test skips and says why
setup-chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	      echo "could not install chromium: tests/integration/test_html_report.py will skip"; \
	  else echo "chromium not found and not root: tests/integration/test_html_report.py will skip"; fi; }

# the package's shape and style, checked before the tests: import-linter's layer contract
# (.importlinter), ruff (ruff.toml), snakefmt (pyproject [tool.snakefmt]); ~10 s
check: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/

test: setup setup-bioformats setup-env-twins setup-chromium check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup setup-bioformats
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-slurm: setup
	$(BIN)/python -m pytest -m slurm -rA tests/integration $(PYTEST_ARGS); status=$$?; \
	  if [ "$$(id -u)" -eq 0 ]; then .ci/slurm/stop-cluster.sh 2>/dev/null; fi; exit $$status

# The kill harness (issue 15): a reduced tiny run killed at KILL_POINTS random points (stage processes
# and snakemake itself, alternately; seeded by KILL_SEED) and rerun must end with the tables of an
# uninterrupted run and no .tmp leftovers. Plain pytest (make test) runs it with 3 points.
KILL_POINTS ?= 10
KILL_SEED ?= 0
test-kill: setup
	CELLSTAGE_KILL_POINTS=$(KILL_POINTS) CELLSTAGE_KILL_SEED=$(KILL_SEED) \
	  $(BIN)/python -m pytest -m kill -s -rA tests/integration/test_kill.py $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest tests/benchmarks -s $(PYTEST_ARGS)

lint: check demo-data
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results .snakemake
