# cwtops: one command to set up, one to run the main job, one to test.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TRITON  ?= .triton
PYTRITON_VERSION ?= 0.7.0

.PHONY: setup perf-analyzer system-packages run test test-fast bench clean

# Debian packages the tests need: PostgreSQL (throwaway clusters under the MLflow registry tests)
# and Chromium with its driver (the promotion test in a real browser). Installed when run as root;
# otherwise the command that installs them is printed and the target fails.
DEBIAN_TEST_PACKAGES ?= postgresql chromium chromium-driver

$(BIN)/cwtops: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# tritonserver ships inside the nvidia-pytriton wheel, which pins numpy<2: it lives in
# its own folder, unpacked without its dependencies, so the main resolver never sees it.
$(TRITON)/.installed:
	$(BIN)/pip install -q --no-deps --target $(TRITON) nvidia-pytriton==$(PYTRITON_VERSION)
	touch $@

setup: $(BIN)/cwtops $(TRITON)/.installed

# Triton's C++ load generator (from the tritonclient 2.51 wheel) for the serving benchmark and its
# test; it adds the CUDA runtime library it links (a wheel) and, as root, Debian's libb64-0d.
perf-analyzer: setup
	$(BIN)/python -m bench.perf_analyzer install

system-packages: setup
	$(BIN)/python -m cwtops.services.debian $(DEBIAN_TEST_PACKAGES)

run: setup
	$(BIN)/cwtops run

test: setup perf-analyzer system-packages
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

bench: setup perf-analyzer
	$(BIN)/cwtops bench

clean:
	rm -rf $(VENV) $(TRITON)
