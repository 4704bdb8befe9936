PYTHON ?= python3

.PHONY: install test demo bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	mamba2d demo

bench:
	$(PYTHON) benchmarks/scan.py
