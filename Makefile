# Two commands on a fresh machine:  make train [DATA=/path/to/cifar10]   and   make test
# (`make smoke`: a one-minute check that training works). Without make: see the README's install section.
VENV    ?= .venv
PYTHON  ?= python3
DATA    ?=
MODEL   ?= caffe-quick
WORKERS ?= 2
EPOCHS  ?=
ARGS    ?=
TORCH   ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The smoke run's data: DATA, else the shared CIFAR-10 copy beside the project, else the download.
SMOKE_DATA ?= $(or $(DATA),$(wildcard ../shared/datasets/cifar10-jpg))

SETUP_STAMP := $(VENV)/.distvision-installed

.PHONY: setup train smoke test test-fast lint bench clean postgres

$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so pyproject's range keeps it: a bare "torch" from PyPI is the multi-GB CUDA
	# build. A wheel pip finds without an index (a local wheel folder, as on the machines here), else PyPI's
	# CUDA build where an NVIDIA driver is, else PyTorch's CPU build from its own index.
	if $(VENV)/bin/pip install --quiet --dry-run --no-index --no-deps '$(TORCH)' >/dev/null 2>&1 || \
	   command -v nvidia-smi >/dev/null; then \
		$(VENV)/bin/pip install --quiet '$(TORCH)'; \
	else \
		$(VENV)/bin/pip install --quiet '$(TORCH)' --index-url $(TORCH_CPU_INDEX); \
	fi
	# Every extra (every command and its plots) and the test tools.
	$(VENV)/bin/pip install --quiet -e '.[all,test]'
	# Byte-compiled once here: with PYTHONDONTWRITEBYTECODE set (as on these machines) every worker
	# process would otherwise compile distvision again (0.2 s a process, hundreds of them in the tests).
	$(VENV)/bin/python -m compileall -q distvision
	touch $@

setup: $(SETUP_STAMP)

train: setup
	$(VENV)/bin/distvision train $(if $(DATA),--data $(DATA)) --model $(MODEL) --workers $(WORKERS) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

# Training end to end in about half a minute on 2 cores: one epoch of the MLP on 2% of CIFAR-10 on 2
# workers, tested on the whole test split (the first run also decodes the images into the cache).
smoke: setup
	rm -rf runs/smoke
	$(VENV)/bin/distvision train $(if $(SMOKE_DATA),--data $(SMOKE_DATA)) --model mlp --workers 2 --epochs 1 \
		--train-fraction 0.02 --out runs/smoke

# Lint (style and the import layering) first, then both tiers: the unit tier, which starts no process
# and takes under a minute, before the end-to-end tier (tests/e2e, real processes, several minutes;
# two test files at a time, each file's tests in one process so its shared runs are made once).
test: setup lint postgres
	$(VENV)/bin/python -m pytest tests/unit -q
	$(VENV)/bin/python -m pytest tests/e2e -q -n 2 --dist loadfile --durations=20

# The unit tier alone, for the edit-test loop.
test-fast: setup
	$(VENV)/bin/python -m pytest tests/unit -q

# distvision tune's shared-study test runs a real PostgreSQL server (Debian's); install it where
# missing and possible (root with apt), else that one test skips.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  apt-get install -y -qq --no-install-recommends postgresql; } || \
		echo "PostgreSQL is not installed: the tune test that needs it will skip"

# ruff and import-linter come with the test extras; the layering contracts are in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check distvision tests benchmarks
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/pip install --quiet -e '.[compare]' '$(TORCH)'
	$(VENV)/bin/python benchmarks/throughput.py --data $(or $(DATA),../shared/datasets/cifar10-jpg)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
