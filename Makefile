# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv from
# pyproject.toml's pinned dependencies the first time (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint build bench bench-failover bench-spool clean
.PHONY: fuzz bench-soak bench-continuity

# (PGSIDECAR_PURE: the compiled data path is built by `build` below, with the venv's mypy. No build
# isolation: pyproject's build requirements are what mypyc needs for a wheel, which this
# editable install does not build; setuptools from the venv does.)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 'setuptools==80.9.0'
	PGSIDECAR_PURE=1 $(VENV)/bin/pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The data path (proxy/compiled.py's MODULES) compiled with mypyc into C extensions beside the
# sources; redone whenever the package's sources change (mypyc type-checks them all). If it cannot
# be built, or a source changed since, pgsidecar runs from the sources (proxy/compiled.py decides).
BUILT := $(VENV)/.compiled
$(BUILT): $(STAMP) setup.py $(wildcard proxy/*.py proxy/*/*.py sidecar_config/*.py)
	$(VENV)/bin/python setup.py -q build_ext --inplace
	touch $(BUILT)

build: $(BUILT)

demo: $(BUILT)
	$(VENV)/bin/pgsidecar demo $(ARGS)

# The suite starts with the linters: ruff, mypy and the import contracts (pyproject.toml's
# [tool.importlinter]) clean is part of passing. It runs the compiled build, the one that ships.
test: lint $(BUILT)
	$(VENV)/bin/pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports

bench: $(BUILT)
	$(VENV)/bin/python -m bench.pgbench_compare $(ARGS)

bench-failover: $(BUILT)
	$(VENV)/bin/python -m bench.failover_drill $(ARGS)

# What transaction replay and commit markers cost: the same sidecar with them on and off,
# alternating pgbench rounds (select-only CPU per transaction, tpcb-like TPS), and memory per client.
bench-continuity: $(BUILT)
	$(VENV)/bin/python -m bench.continuity_cost $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache proxy/compiled.json tests/harness/node/node_modules
	find proxy -name '*.so' -delete

# The browser test (tests/browser) drives Debian's headless Chromium through chromedriver; install
# them when missing (as root, like the rest of the machine setup).
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	touch $@
test: $(CHROMIUM_STAMP)

# The JDBC tests run pgjdbc (Debian's libpostgresql-jdbc-java) on a JDK (java runs the workload's
# source file directly, which needs javac's compiler module); install them when missing.
JDBC_STAMP := $(VENV)/.jdbc
$(JDBC_STAMP): $(STAMP)
	command -v java >/dev/null && command -v javac >/dev/null && test -f /usr/share/java/postgresql.jar || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends default-jdk-headless libpostgresql-jdbc-java; }
	touch $@
test: $(JDBC_STAMP)

# The node-postgres tests run Node.js (Debian's, when missing) with the `pg` package pinned in
# tests/harness/node/package-lock.json.
NODE_STAMP := tests/harness/node/node_modules/.installed
$(NODE_STAMP): tests/harness/node/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; }
	cd tests/harness/node && npm ci --silent --no-audit --no-fund
	touch $@
test: $(NODE_STAMP)

bench-spool: $(BUILT)
	$(VENV)/bin/python -m bench.spool_bench $(ARGS)

# The protocol fuzzer's long run (tests/fuzz/), for a release: FUZZ_SECONDS spread over its four
# modes with random seeds (`make test` runs it briefly, derandomized).
FUZZ_SECONDS ?= 1800
fuzz: $(BUILT)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(VENV)/bin/pytest -q -p no:cacheprovider tests/fuzz $(ARGS)

# Soak and chaos (bench/soak.py): 30 minutes of mixed load under a repeating fault schedule.
bench-soak: $(BUILT)
	$(VENV)/bin/python -m bench.soak $(ARGS)

# The alert rules (deploy/prometheus) are checked with promtool, from Debian's `prometheus`
# package; install it when missing. (On a host booted with systemd the package also enables a
# Prometheus server on :9090; `systemctl disable --now prometheus` if you do not want it.)
PROMTOOL_STAMP := $(VENV)/.promtool
$(PROMTOOL_STAMP): $(STAMP)
	command -v promtool >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
	touch $@
test: $(PROMTOOL_STAMP)

# The wheel as a user outside this checkout builds it (`pip wheel .`: mypyc in pip's isolated
# build environment, about 2 minutes), installed into a fresh venv, must start with
# data_path=compiled. Not part of `make test`, to keep the suite short; .ci/run runs both.
.PHONY: wheel-check
wheel-check: $(STAMP)
	PGSIDECAR_WHEEL_CHECK=1 $(VENV)/bin/pytest -q tests/integration/test_wheel.py
