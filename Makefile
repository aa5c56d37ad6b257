# Two commands on a fresh clone: `make train` and `make test`. Each creates .venv and installs what it
# needs when missing. Pass Hydra overrides with ARGS, e.g. make train ARGS="model.levels=2".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-quick lint bench ablation-quick mechanism gpu-check wheelhouse install-offline clean

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

# The whole suite, slow end-to-end tests included, on TEST_WORKERS processes (pytest-xdist): one test file
# per worker at a time, so that a file's trained fixtures are built once (see tests/conftest.py).
TEST_WORKERS ?= 2

test: $(INSTALLED) lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The quick loop while developing: the suite without its slow (end-to-end) tests.
test-quick: $(INSTALLED)
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile

bench: $(INSTALLED)
	$(PY) -m sfseg.bench $(ARGS)

ablation-quick: $(INSTALLED)
	$(PY) -m sfseg.ablation $(ARGS)

# The controlled experiment of the paper's claim (<= 45 min on a 2-core CPU): see docs/mechanism.md.
mechanism: $(INSTALLED)
	$(PY) -m sfseg.ablation --preset mechanism $(ARGS)

# Does it work on this GPU node, and how fast? Six stages in <= 10 minutes, report in gpu_check/report.md
# (docs/gpu.md, "First run on a GPU node"). E.g. make gpu-check ARGS="--minutes 15 --out gpu_check_a100".
gpu-check: $(INSTALLED)
	$(PY) -m sfseg.gpu_check $(ARGS)

# Clusters without internet (docs/gpu.md). On a machine with internet (a login node), wheels of every runtime
# dependency for the cluster's Python and platform in one folder; needs python3 and pip only, no .venv.
# WITH_TORCH=0 leaves out torch and torchvision (and what only they need) where the cluster provides them.
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLATFORM ?= manylinux_2_28_x86_64
WITH_TORCH ?= 1
comma := ,

wheelhouse:
	PYTHONPATH=src $(PYTHON) -m sfseg.wheelhouse --dest $(WHEELHOUSE) --python-version $(PYTHON_VERSION) \
		--platform $(PLATFORM) $(if $(filter 0,$(WITH_TORCH)),--without torch$(comma)torchvision)

# On the cluster, with no network: .venv (which sees the system's packages, e.g. a module's torch) and sfseg
# installed editable from the wheelhouse alone. Then make gpu-check, make train, ... use it.
install-offline:
	@test -d "$(WHEELHOUSE)" || { echo "no wheelhouse at $(WHEELHOUSE): build one with make wheelhouse where there is internet, copy it here, and give WHEELHOUSE=<its folder>"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --disable-pip-version-check --no-index --find-links $(WHEELHOUSE) -e .
	touch $(INSTALLED)

clean:
	rm -rf outputs multirun .pytest_cache
