PYTHON ?= python3

.PHONY: install test demo bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[test]'
	@# Real images for the benchmark and tests (Debian's package); scikit-learn's digits stand in without it.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		echo "note: could not install dataset-fashion-mnist; tests fall back to scikit-learn digits"; fi

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	mamba2d demo

bench:
	$(PYTHON) benchmarks/scan.py
