# Two commands on a fresh clone: `make train` and `make test`. Each creates .venv and installs what it
# needs when missing. Pass Hydra overrides with ARGS, e.g. make train ARGS="model.levels=2".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test lint bench ablation-quick mechanism clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

train: $(INSTALLED)
	$(PY) -m sfseg.train $(ARGS)

lint: $(INSTALLED)
	$(PY) -m ruff check src tests notebooks
	$(PY) -m ruff format --check src tests notebooks

test: $(INSTALLED) lint
	$(PY) -m pytest

bench: $(INSTALLED)
	$(PY) -m sfseg.bench $(ARGS)

ablation-quick: $(INSTALLED)
	$(PY) -m sfseg.ablation $(ARGS)

# The controlled experiment of the paper's claim (<= 45 min on a 2-core CPU): see docs/mechanism.md.
mechanism: $(INSTALLED)
	$(PY) -m sfseg.ablation --preset mechanism $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
