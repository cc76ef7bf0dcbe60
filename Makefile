# make demo: the whole story on the embedded default (real Triton, MLflow on sqlite).
# make test: the test suite (real Triton, real MLflow).
# Both create .venv and install what they need the first time; later runs reuse it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install prometheus demo demo-airflow test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

install: $(STAMP)

prometheus:
	bash scripts/install_prometheus.sh

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

demo-airflow: install
	$(BIN)/python scripts/demo_airflow.py

test: install prometheus
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/deploy_overhead.py
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .ferry-demo .ferry-demo-airflow .pytest_cache
