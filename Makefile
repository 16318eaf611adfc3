# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv from
# pyproject.toml's pinned dependencies the first time (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-failover bench-spool clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pgsidecar demo $(ARGS)

# The suite starts with the linters: ruff and mypy clean is part of passing.
test: lint
	$(VENV)/bin/pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

bench: $(STAMP)
	$(VENV)/bin/python -m bench.pgbench_compare $(ARGS)

bench-failover: $(STAMP)
	$(VENV)/bin/python -m bench.failover_drill $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache

# The browser test (tests/browser) drives Debian's headless Chromium through chromedriver; install
# them when missing (as root, like the rest of the machine setup).
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }
	touch $@
test: $(CHROMIUM_STAMP)

bench-spool: $(STAMP)
	$(VENV)/bin/python -m bench.spool_bench $(ARGS)
