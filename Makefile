# Two commands on a fresh machine:  make train [DATA=/path/to/cifar10]   and   make test
VENV    ?= .venv
PYTHON  ?= python3
DATA    ?=
MODEL   ?= caffe-quick
WORKERS ?= 2
EPOCHS  ?=
ARGS    ?=

SETUP_STAMP := $(VENV)/.distvision-installed

.PHONY: setup train test lint bench clean

$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(SETUP_STAMP)

train: setup
	$(VENV)/bin/distvision train $(if $(DATA),--data $(DATA)) --model $(MODEL) --workers $(WORKERS) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/pip install --quiet ruff
	$(VENV)/bin/ruff check distvision tests benchmarks

bench: setup
	$(VENV)/bin/pip install --quiet -e '.[bench]' torch==2.13.0
	$(VENV)/bin/python benchmarks/throughput.py --data $(or $(DATA),../shared/datasets/cifar10-jpg)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
