# Two entry points do all set-up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: quickstart test testenv tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train]'
	touch $@

$(VENV)/.all: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,operator,service,eval,test]'
	touch $@ $(VENV)/.train

quickstart: $(VENV)/.train
	$(BIN)/dlmctl submit examples/quickstart.yaml --backend local --wait --replace

testenv: $(VENV)/.all
	tests/testenv/build

# Debian's Prometheus: the dashboards' queries run against it (tests start and stop it themselves).
tools:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

test: testenv tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
