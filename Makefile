# bnbook: the two commands are `make book` and `make test` (CI runs `.ci/run`, which runs `make test`).
#
#   make book                  build the HTML book into _build/html (warnings are errors)
#   make test                  lint, unit tests, every notebook re-executed (every assert must hold;
#                              the machine-independent outputs compared), the book build, the browser test
#   make test-robust [NB=path] every notebook (or one) re-executed with BNBOOK_SEED=1, with BNBOOK_SEED=2,
#                              and on another CPU kernel path (ROBUST="seed7 kernel" picks); every assert must hold
#   make test-exact            every stored output compared exactly (holds on the machine that wrote them)
#   make test-lowest           `pip install .` at the lowest versions pyproject.toml admits, then the unit
#                              tests and every notebook (BNBOOK_SEED=1) against that installed package
#   make execute [NB=path]     re-execute every notebook (or one) in place to refresh stored outputs
#   make student               the student edition: notebooks with stubs and graders, in _build/student
#   make stable-cells          re-tag the cells whose outputs depend neither on the CPU nor on the draw
#   make test-nb NB=path       the portable notebook check for one notebook
#   make lint | unit | nbval | browser | vendor | venv | clean
#
# Everything runs in .venv, created from exactly requirements.txt the first time (a few minutes)
# and reused afterwards: the stamp file below is keyed on the contents of requirements.txt and
# pyproject.toml, so editing a pin reinstalls and nothing else does.

SHELL := /bin/bash
.DEFAULT_GOAL := help

BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)

# Build-time JavaScript, never committed (see html_static_path in _config.yml).
VENDOR := _build/vendor
VENDOR_STAMP := $(VENDOR)/.complete-v1
HTML_MANAGER := @jupyter-widgets/html-manager@1.0.15
REQUIREJS := requirejs@2.3.7

SANITIZE := chapters/nbval_sanitize.cfg
# Another CPU kernel path on the same machine: torch's portable (non-vectorised) ATen kernels,
# oneDNN limited to SSE4.1, MKL's conditional-reproducibility branch, OpenBLAS's SSE3 kernels (unless
# the machine already sets OPENBLAS_CORETYPE, which it then does for a reason).
OPENBLAS_CORETYPE ?= Prescott
KERNEL_ENV := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE OPENBLAS_CORETYPE=$(OPENBLAS_CORETYPE)
# Those kernels are slower by design (no wide vector instructions): the whole book ran 1.45x as long
# on them (668 s against 461 s, one 2-core machine), so test-robust's kernel run gets time budgets
# 1.5x the reader's (tests/conftest.py); make test keeps the reader's 60 s and 8 minutes.
KERNEL_BUDGET := BNBOOK_NB_BUDGET=90 BNBOOK_BOOK_BUDGET=720
# test-robust's variants: seedN runs under BNBOOK_SEED=N (any N), kernel under KERNEL_ENV.
ROBUST ?= seed1 seed2 kernel
# The notebooks, in _toc.yml order (notebooks on disk but not in the toc are caught by tests/test_book.py).
NOTEBOOKS = $(shell $(PY) .ci/notebooks.py)
# Notebook runs: one thread (setup_notebook also pins it), no progress bars in stored outputs.
NB_ENV := BNBOOK_EXECUTE=1 BNBOOK_QUIET=1 TQDM_DISABLE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYDEVD_DISABLE_FILE_VALIDATION=1
NBVAL_WORKERS ?= 2
# Per-cell limit (s) when executing; generous because the machine may be shared.
CELL_TIMEOUT ?= 300

.PHONY: help venv vendor book student test test-robust test-exact test-lowest stable-cells lint unit nbval browser execute test-nb clean

help:
	@sed -n '1,20p' Makefile | sed 's/^# \{0,1\}//'

# --- environment -------------------------------------------------------------------------------
venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || { echo "Creating $(VENV) with $(BOOTSTRAP_PYTHON)"; $(BOOTSTRAP_PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "$(VENV) is ready ($$($(PY) --version))"

# MathJax 3 (from the installed PyPI package django-static-mathjax) and the widget manager +
# require.js (from the npm registry), copied into $(VENDOR), which Sphinx serves as static files.
vendor: $(VENDOR_STAMP)

$(VENDOR_STAMP): $(STAMP)
	@command -v npm >/dev/null || { echo "npm is needed to fetch the widget JavaScript (apt-get install npm)"; exit 1; }
	rm -rf $(VENDOR)
	mkdir -p $(VENDOR)/mathjax/output/chtml/fonts $(VENDOR)/mathjax/input/tex $(VENDOR)/widgets $(VENDOR)/npm
	@mj=$$($(PY) -c "import mathjax, pathlib; print(pathlib.Path(mathjax.__file__).parent / 'static' / 'mathjax' / 'es5')"); \
	  cp "$$mj/tex-chtml.js" $(VENDOR)/mathjax/ && \
	  cp -r "$$mj/output/chtml/fonts/woff-v2" $(VENDOR)/mathjax/output/chtml/fonts/ && \
	  cp -r "$$mj/input/tex/extensions" $(VENDOR)/mathjax/input/tex/ && \
	  cp -r "$$mj/ui" "$$mj/a11y" "$$mj/sre" $(VENDOR)/mathjax/ && \
	  echo "MathJax $$($(PY) -c 'import importlib.metadata as m; print(m.version("django-static-mathjax"))') copied from $$mj"
	cd $(VENDOR)/npm && npm pack --silent $(HTML_MANAGER) $(REQUIREJS) >/dev/null
	cd $(VENDOR)/npm && for t in *.tgz; do mkdir -p "$${t%.tgz}" && tar xzf "$$t" -C "$${t%.tgz}"; done
	cp $(VENDOR)/npm/jupyter-widgets-html-manager-*/package/dist/embed-amd.js $(VENDOR)/widgets/
	cp $(VENDOR)/npm/jupyter-widgets-html-manager-*/package/dist/*.{woff2,woff,ttf,eot,svg} $(VENDOR)/widgets/
	cp $(VENDOR)/npm/requirejs-*/package/require.js $(VENDOR)/widgets/
	rm -rf $(VENDOR)/npm
	@touch $@

# --- the book ----------------------------------------------------------------------------------
book: $(STAMP) $(VENDOR_STAMP) student
	$(BIN)/jupyter-book build . --all -W -n --keep-going
	mkdir -p _build/html/student && cp _build/student/bnbook-student-notebooks.zip _build/html/student/
	@echo
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

# The student edition, generated from the chapters (.ci/student.py; the course page links the archive).
student: $(STAMP)
	$(PY) .ci/student.py _build/student $(NOTEBOOKS)

# --- tests -------------------------------------------------------------------------------------
# Order: fast static checks first, then the slow re-execution, then the build and the browser.
test: lint unit nbval book browser
	@echo "make test: all checks passed"

lint: $(STAMP)
	$(BIN)/ruff check bnbook tests chapters bench .ci _ext
	$(BIN)/ruff format --check bnbook tests chapters bench .ci _ext

# Unit, property and parity tests of the package, its doctests, and the book-wide notebook checks.
# A test still running after 120 s (the slowest normally take 25) gets its threads' stacks printed.
unit: $(STAMP)
	$(NB_ENV) $(BIN)/pytest tests bnbook --doctest-modules --ignore=tests/test_browser.py -p no:cacheprovider \
	  -n $(NBVAL_WORKERS) --durations=8 -o faulthandler_timeout=120

# Every notebook re-executed in a fresh kernel (nbval, lax): a cell that raises, an assert that
# fails, fails the test. Outputs are compared only in cells tagged nbval-check-output, the ones whose
# output does not depend on the CPU's kernels (see `make stable-cells` and CONTRIBUTING.md). Notebooks
# run single-threaded, so two workers on two cores; each notebook stays on one worker.
# tests/conftest.py (loaded with -p) prints the time table and enforces the time budget.
NBVAL = $(NB_ENV) $(PY) -m pytest $(NOTEBOOKS_OR_NB) --nbval-sanitize-with $(SANITIZE) \
	  -p tests.conftest -p no:cacheprovider -n $(NBVAL_WORKERS) --dist loadfile
NOTEBOOKS_OR_NB = $(if $(NB),$(NB),$(NOTEBOOKS))

nbval: $(STAMP)
	$(NBVAL) --nbval-lax

test-nb: $(STAMP)
	@test -n "$(NB)" || { echo "usage: make test-nb NB=chapters/02_transform.ipynb"; exit 2; }
	$(NBVAL) --nbval-lax

# Other draws and another kernel path: every assert must still hold. Under another seed no output is
# compared; under the kernel variant the tagged (machine-independent) cells still are.
test-robust: $(STAMP)
	@set -e; for v in $(ROBUST); do \
	  case $$v in \
	    seed[0-9]*) vars="BNBOOK_SEED=$${v#seed}";; \
	    kernel) vars="$(KERNEL_ENV) $(KERNEL_BUDGET)";; \
	    *) echo "unknown test-robust variant: $$v (known: seedN, kernel)"; exit 2;; \
	  esac; \
	  echo "=== test-robust, $$v: $$vars"; \
	  env $$vars $(NBVAL) --nbval-lax; \
	done

# Every stored output compared exactly (nbval strict). Training results depend on the CPU's kernels,
# so this holds only on a machine like the one that wrote the outputs (CONTRIBUTING.md).
test-exact: $(STAMP)
	$(NBVAL) --nbval

# The package as a hosted notebook installs it (`pip install .`, not requirements.txt), at the floor
# of every range in pyproject.toml (.ci/lowest.py; torch stays at the local build), in a fresh venv.
# The tests and notebooks then import the installed copy, not the working tree; the notebooks run
# under BNBOOK_SEED=1, so this is also a run on another draw.
LOWEST := _build/lowest
LOWEST_TOOLS := pytest pytest-xdist hypothesis expecttest nbval ipykernel nbformat pyyaml pandas keras
test-lowest: $(STAMP)
	rm -rf $(LOWEST) && $(BOOTSTRAP_PYTHON) -m venv $(LOWEST)/venv
	$(PY) .ci/lowest.py > $(LOWEST)/floors.txt
	@echo "floors: $$(tr '\n' ' ' < $(LOWEST)/floors.txt)"
	$(LOWEST)/venv/bin/pip install --disable-pip-version-check -q torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')
	$(LOWEST)/venv/bin/pip install --disable-pip-version-check -q . $(LOWEST_TOOLS) -c $(LOWEST)/floors.txt
	$(LOWEST)/venv/bin/pip list --format=freeze | grep -iE '^(numpy|torch|matplotlib|ipywidgets|mlxtend|tqdm)=='
	$(NB_ENV) $(LOWEST)/venv/bin/pytest tests -p no:cacheprovider -q -n $(NBVAL_WORKERS) --ignore=tests/test_browser.py \
	  --ignore=tests/test_book.py --ignore=tests/test_student.py
	cd /tmp && $(CURDIR)/$(LOWEST)/venv/bin/python -c 'import bnbook; print("testing", bnbook.__file__)'
	$(NB_ENV) BNBOOK_SEED=1 $(LOWEST)/venv/bin/python -m pytest $(NOTEBOOKS) --nbval-lax -p tests.conftest \
	  -p no:cacheprovider -n $(NBVAL_WORKERS) --dist loadfile

# Re-tag the machine-independent cells: execute every notebook (or NB) on the other kernel path and
# under BNBOOK_SEED=1 into _build/stable, and tag the cells whose outputs equal the stored ones in both.
STABLE_RUN = $(BIN)/jupyter nbconvert --to notebook --execute --log-level=ERROR \
	  --ExecutePreprocessor.timeout=$(CELL_TIMEOUT) --ExecutePreprocessor.kernel_name=python3

stable-cells: $(STAMP)
	@mkdir -p _build/stable/kernel _build/stable/seed1
	printf '%s\n' $(NOTEBOOKS_OR_NB) | xargs -P $(NBVAL_WORKERS) -I{} sh -c '\
	  $(NB_ENV) $(KERNEL_ENV) $(STABLE_RUN) --output-dir _build/stable/kernel "{}" && \
	  $(NB_ENV) BNBOOK_SEED=1 $(STABLE_RUN) --output-dir _build/stable/seed1 "{}" && \
	  $(PY) .ci/stable_cells.py "{}" "_build/stable/kernel/$$(basename {})" \
	    "_build/stable/seed1/$$(basename {})"'

browser: $(STAMP)
	$(BIN)/pytest tests/test_browser.py -p no:cacheprovider

# --- refreshing stored outputs -----------------------------------------------------------------
execute: $(STAMP)
	@set -e; for nb in $(if $(NB),$(NB),$(NOTEBOOKS)); do \
	  echo "executing $$nb"; \
	  $(NB_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=$(CELL_TIMEOUT) \
	    --ExecutePreprocessor.kernel_name=python3 --log-level=WARN "$$nb"; \
	  $(PY) .ci/nbstrip.py "$$nb"; \
	done

clean:
	rm -rf _build
