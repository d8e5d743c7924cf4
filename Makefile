# `make demo` and `make test` do all the setup on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.jlora-installed
TESTS  := $(VENV)/.jlora-test-installed

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(BASE): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

# the test extras add pytest and the parity oracles (torch CPU, transformers, peft)
$(TESTS): $(BASE)
	$(PY) -m pip install --quiet -e ".[test,parity]"
	touch $(TESTS)

install: $(BASE)

test: $(TESTS)
	$(PY) -m pytest tests -q -n 2 --durations=10

demo: $(BASE)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
