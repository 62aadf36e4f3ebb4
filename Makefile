# Each target sets itself up: a virtual environment in .venv, the project
# installed editable with its test extra (which compiles emu/_native.c).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml setup.py emu/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dmfrag.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/emu_bench.py

clean:
	rm -rf $(VENV) build *.egg-info emu/*.so .pytest_cache .hypothesis
