#!/usr/bin/env bash
# One-command GPU check: builds the extension in place for the visible card, runs every CUDA test and
# the op benchmark on the device, and writes the logs and JSON under OUTDIR (at most 8 files).
#
#   tools/gpu_check.sh OUTDIR            # e.g. tools/gpu_check.sh /tmp/gpu_check
#
# Needs python3 with torch (CUDA build) and torchvision, nvcc, pytest. detectron2 is optional: without
# it the model-level tests (AMP trainer step) are skipped and the op tests and the op benchmark still
# run. Environment: PYTHON (default python3), MAX_JOBS (default: all cores), GPU_CHECK_TESTS (the
# test files), GPU_CHECK_REPEAT (benchmark rounds, default 30). Targets about 6 minutes on one H200.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the package is used from the source tree (built in place), not installed
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: >"$summary"

# step NAME LIMIT_S CMD...: runs CMD with a time limit, appends its output to OUTDIR/NAME.log and a
# line (exit status, seconds) to summary.txt.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "### $*" >>"$out/$name.log"
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $(($(date +%s) - start)) s: $*" | tee -a "$summary"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  command -v nvcc && nvcc --version | tail -2
  "$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  "$PY" -c "import detectron2; print('detectron2', detectron2.__version__)" 2>&1 | tail -1
} >"$out/machine.txt" 2>&1

step build 420 env DCNV2_WITH_CUDA=1 "$PY" setup.py build_ext --inplace || { echo "build failed" | tee -a "$summary"; exit 1; }

tests=${GPU_CHECK_TESTS:-$(ls tests/test_cuda_path.py tests/test_determinism.py tests/test_op_errors.py \
  tests/test_amp.py tests/test_fuzz_ops.py 2>/dev/null | tr '\n' ' ')}
if ! "$PY" -c "import detectron2" 2>/dev/null; then
  tests=${tests//tests\/test_amp.py/}  # its model-level tests need detectron2
fi
# -k cuda would miss tests whose ids do not say cuda; run the files whole (their CPU cases are quick)
step tests 300 "$PY" -m pytest $tests -q -ra -p no:cacheprovider --durations=10 --continue-on-collection-errors

for dtype in float32 float16; do
  step bench 150 "$PY" tools/benchmark_ops.py --device cuda --dtype $dtype --repeat "${GPU_CHECK_REPEAT:-30}" \
    --json "$out/bench_cuda_$dtype.json"
done
echo "done: $out" | tee -a "$summary"
