# Two commands on a fresh machine:  make train [DATA=/path/to/cifar10]   and   make test
VENV    ?= .venv
PYTHON  ?= python3
DATA    ?=
MODEL   ?= caffe-quick
WORKERS ?= 2
EPOCHS  ?=
ARGS    ?=

SETUP_STAMP := $(VENV)/.distvision-installed

.PHONY: setup train test test-fast lint bench clean postgres

$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel; a bare "torch" would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# Byte-compiled once here: with PYTHONDONTWRITEBYTECODE set (as on these machines) every worker
	# process would otherwise compile distvision again (0.2 s a process, hundreds of them in the tests).
	$(VENV)/bin/python -m compileall -q distvision
	touch $@

setup: $(SETUP_STAMP)

train: setup
	$(VENV)/bin/distvision train $(if $(DATA),--data $(DATA)) --model $(MODEL) --workers $(WORKERS) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

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
	$(VENV)/bin/pip install --quiet -e '.[bench]' torch==2.13.0
	$(VENV)/bin/python benchmarks/throughput.py --data $(or $(DATA),../shared/datasets/cifar10-jpg)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
