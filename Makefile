# make setup: create .venv/ and install everything (torch, detectron2, this project with its extension,
#             including the test-only _emulated_cuda_* ops: DCNV2_BUILD_EMULATED_CUDA=1).
# make test:  run the whole test suite from .venv/.
# make lint:  ruff (lint + format check, pyproject.toml) and clang-format (.clang-format) on the tree;
#             make format applies both formatters.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# auto: detectron2 from its git repository, falling back to the offline PyPI build; git; pypi (see README)
DETECTRON2_SOURCE ?= auto
PYTEST_ARGS ?=

.PHONY: setup test lint format clean

setup:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	DETECTRON2_SOURCE=$(DETECTRON2_SOURCE) $(PY) dev/install_detectron2.py
	DCNV2_BUILD_EMULATED_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -v -e . --no-build-isolation --no-deps
	$(PY) -c "import projects_dcnv2, torch; print('projects_dcnv2 ready: CUDA kernels', 'built' if projects_dcnv2.layers.WITH_CUDA else 'not built')"

# pytest exits with 5 when it collected no test: that is a failure here.
test:
	@$(PY) -m pytest tests -ra --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing"; exit 1; fi; exit $$rc

CXX_SOURCES = $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format:
	$(PY) -m ruff check --fix --select I .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build projects_dcnv2/_C*.so projects_dcnv2/ops/_C*.so *.egg-info
