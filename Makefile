# cwtops: one command to set up, one to run the main job, one to test.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TRITON  ?= .triton
PYTRITON_VERSION ?= 0.7.0

.PHONY: setup perf-analyzer run test test-fast bench clean

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

run: setup
	$(BIN)/cwtops run

test: setup perf-analyzer
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

bench: setup perf-analyzer
	$(BIN)/cwtops bench

clean:
	rm -rf $(VENV) $(TRITON)
