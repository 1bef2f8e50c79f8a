#!/usr/bin/env bash
# Everything one GPU session needs, in one command (run from the repository root, e.g. through the
# device tool): build the extension with CUDA on that machine, run the op tests (CUDA cases
# included), and write the benchmark table. Results go to $OUT (default bench/results/gpu-run).
#   bash bench/gpu_run.sh
# Needs torch (a CUDA build), nvcc and pytest; the method tests (transformers/peft) are not run.
set -euo pipefail
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc)
  if grep -qs '^exec ' "$nvcc_path"; then CUDA_HOME=$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$nvcc_path")
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")"); fi
  export CUDA_HOME
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
start=$(date +%s)
SUBSPACE_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
python -c 'import subspace_ext as se; assert se.cuda_enabled(), "not a CUDA build"'
python -m pytest tests/test_philox.py tests/test_importance.py tests/test_rsvd.py tests/test_small_svd.py tests/test_project.py \
  tests/test_opcheck.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -15
python -m subspace_ext.cli bench --device cuda --large --output "$OUT/bench.md" > /dev/null
python -m subspace_ext.cli bench --device cpu --threads "$(nproc)" --output "$OUT/bench_cpu.md" > /dev/null
cat "$OUT/bench.md"
