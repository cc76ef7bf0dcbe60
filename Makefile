# make demo: the whole story on the embedded default (real Triton, MLflow on sqlite).
# make test: the test suite (real Triton, real MLflow, real Airflow, real Prometheus), with lint and the import contract.
# make test-fast: the unit tier only (in-process fakes of Triton and MLflow), in seconds.
# All create .venv and install what they need the first time (versions pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Tests run side by side (each has its own Triton and MLflow): the servers wait on I/O much of the time.
WORKERS ?= 3

.PHONY: install prometheus perf-analyzer demo demo-airflow demo-fleet demo-release demo-watch test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,test,examples]'
	touch $(STAMP)

install: $(STAMP)

prometheus:
	bash scripts/install_debian.sh

# NVIDIA's perf_analyzer in its own venv (.venv-bench), for bench/perf.py; run it as bench/perf_analyzer.
perf-analyzer:
	PYTHON=$(PYTHON) bash bench/install_perf_analyzer.sh

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

demo-airflow: install
	$(BIN)/python scripts/demo_airflow.py

demo-fleet: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_fleet.sh

demo-release: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_release.sh

demo-watch: install
	$(BIN)/python scripts/demo_watch.py

lint: install
	$(BIN)/ruff check src tests dags bench examples scripts
	$(BIN)/lint-imports
	$(BIN)/mypy src/ferry

test-fast: install
	$(BIN)/pytest -q tests/unit

test: install prometheus lint
	$(BIN)/pytest -q -n $(WORKERS) --dist worksteal --durations=15

bench: install perf-analyzer
	$(BIN)/python bench/deploy_overhead.py
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/perf.py

clean:
	rm -rf $(VENV) .venv-bench .ferry-demo .ferry-demo-airflow .ferry-demo-fleet .ferry-demo-watch .ferry-tour .pytest_cache
