# `make run`: set up .venv (if needed) and run the pipeline on the built-in default.
# `make test`: set up .venv with the dev extras and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otcurate-installed

.PHONY: run test lint clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import otcurate, otcurate_pipeline, open_clip, ot, prefect, dvc, mlflow, distributed, pytest"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/otcurate run

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src stages flows tests bench
	$(VENV)/bin/ruff format --check src stages flows tests bench
