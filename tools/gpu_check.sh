#!/usr/bin/env bash
# One-command GPU check: installs the carried detectron2 wheels if detectron2 does not import,
# builds the extension in place for the visible card, then runs the steps below, each under a time
# limit and all within one budget (GPU_CHECK_BUDGET seconds, default 560,
# so that the run fits one 10-minute device call with its start), writing each step's log and JSON
# under OUTDIR as it finishes. With PACKDIR, after every step summary.txt, machine.txt, the model
# benchmark JSON and OUTDIR packed as gpu_check.tar.gz are copied there (4 files), so a run cut
# short still brings back what it measured.
#
#   tools/gpu_check.sh OUTDIR [PACKDIR]      # e.g. tools/gpu_check.sh /tmp/gpu_check "$OUT"
#   tools/gpu_check.sh --plan                # print the steps and their limits; run nothing
#
# Steps (GPU_CHECK_STEPS selects and orders them; the limit of each is capped by what is left). By
# default the correctness checks (triton ... fuzz) run first, concurrently (a word with commas is
# such a group); then the timing steps (models, bench_ops, ...) run alone, one after another. If
# the Triton tests fail on the card, every later step runs with DCNV2_CUDA_IMPL=cuda.
#   models      tools/benchmark_model.py, training + inference, the seed's five rows and twins
#   train_net   train_net.py --num-gpus 1 on CUDA, quick shapes mdconv+mdpool config, a short
#               schedule evaluated through COCOEvaluator, then --eval-only on its checkpoint
#   sanitizer   compute-sanitizer memcheck over a trimmed list of the CUDA op tests (the column
#               kernels, DCNV2_CUDA_IMPL=cuda; none uses shared memory, so no racecheck)
#   mimic       train_net.py as train_net, for the quick mimicking config
#   d2_tests    test_amp.py, whose file needs detectron2 (its CUDA op, Pack and model cases)
#   triton      the Triton kernels' tests on CUDA
#   op_tests    test_cuda_path.py (device back-end), test_determinism.py, test_op_errors.py
#   fuzz        test_fuzz_ops.py on CUDA, DCNV2_FUZZ_EXAMPLES (default 60) per test
#   bench_ops   tools/benchmark_ops.py --device cuda: float16, bfloat16, float32 with TF32 on/off
#   models_more tools/benchmark_model.py for the mdconv+mdpool and mimic rows
#   models_impl tools/benchmark_model.py for the mdconv rows with DCNV2_CUDA_IMPL=cuda, =triton
#
# Needs python3 with a CUDA build of torch, torchvision, nvcc, pytest (pytest-xdist used if there).
# Environment: PYTHON (python3), MAX_JOBS (all cores), GPU_CHECK_WHEELS (.gpu_wheels: made by
# dev/prepare_gpu_wheels.py), GPU_CHECK_ARCH (the visible card's compute capability, e.g. 9.0),
# GPU_CHECK_BUDGET, GPU_CHECK_STEPS, GPU_CHECK_REPEAT (benchmark_ops rounds, 20).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-560}
steps=${GPU_CHECK_STEPS:-triton,sanitizer,train_net,d2_tests,op_tests,fuzz mimic models bench_ops models_more models_impl}
plan=0
if [ "${1:-}" = "--plan" ]; then
  plan=1
  out=/tmp/gpu_check_plan
else
  out=${1:?usage: tools/gpu_check.sh OUTDIR [PACKDIR] | --plan}
  mkdir -p "$out" && out=$(cd "$out" && pwd)
fi
pack=${2:-}
t0=$(date +%s)
work=${TMPDIR:-/tmp}/gpu_check_work
summary="$out/summary.txt"
[ $plan = 1 ] || : >"$summary"

packup() {
  [ -n "$pack" ] && [ "${bg:-0}" = 0 ] || return 0
  mkdir -p "$pack"
  cp "$summary" "$out/machine.txt" "$pack/" 2>/dev/null
  cp "$out/models_seed.json" "$pack/" 2>/dev/null
  tar czf "$pack/gpu_check.tar.gz" -C "$out" . 2>/dev/null
}

# step NAME LIMIT_S CMD...: runs CMD with the smaller of LIMIT_S and the seconds left in the
# budget, appends its output to OUTDIR/NAME.log and a line (exit status, seconds) to summary.txt.
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  if [ $plan = 1 ]; then
    printf '%-14s %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  left=$((budget - ($(date +%s) - t0)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped, ${left}s of the budget left: $*" | tee -a "$summary"
    return 124
  fi
  start=$(date +%s)
  echo "### [limit ${limit}s] $*" >>"$out/$name.log"
  timeout -k 10 "$limit" "$@" >>"$out/$name.log" 2>&1  # the whole process group
  rc=$?
  echo "$name: rc=$rc, $(($(date +%s) - start)) s (limit $limit): $*" | tee -a "$summary"
  packup
  return $rc
}
# need_d2 NAME: true when detectron2 imports (or in --plan mode); else says NAME is skipped.
need_d2() {
  [ $plan = 1 ] && return 0
  "$PY" -c "import detectron2" 2>/dev/null && return 0
  echo "$1: skipped, detectron2 does not import (dev/prepare_gpu_wheels.py makes $wheels)" | tee -a "$summary"
  return 1
}

pytest_args=(-q -ra -p no:cacheprovider --durations=10)
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4) || xdist=()

# --------------------------------------------------------------------------------- environment
if [ $plan = 0 ]; then
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    command -v nvcc && nvcc --version | tail -2
    "$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  } >"$out/machine.txt" 2>&1
fi

wheels=${GPU_CHECK_WHEELS:-.gpu_wheels}
site=$work/site
if ! "$PY" -c "import detectron2" 2>/dev/null && [ -d "$wheels" ]; then
  if [ $plan = 0 ]; then
    rm -rf "$site" && mkdir -p "$site"
    want=$(awk '$1 == "python" {print $2}' "$wheels/manifest.txt" 2>/dev/null)
    have=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    [ "$want" = "$have" ] || echo "wheels: $wheels was made for Python ${want:-?}, this is $have" | tee -a "$summary"
  fi
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
fi
# the package is used from the source tree (built in place), not installed
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
if [ $plan = 0 ]; then
  "$PY" -c "import detectron2; print('detectron2', detectron2.__version__, detectron2.__file__)" >>"$out/machine.txt" 2>&1
  arch=${GPU_CHECK_ARCH:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
else
  arch=${GPU_CHECK_ARCH:-"<the card's>"}
fi

if [ $plan = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "no CUDA device visible to $PY: nothing built, no step run (--plan prints them)" | tee -a "$summary"
  packup
  exit 2
fi

# One architecture, the card's: the default list (every architecture torch was built for) would
# multiply the build time.
step build 120 env DCNV2_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py build_ext --inplace ||
  { [ $plan = 1 ] || { echo "build failed" | tee -a "$summary"; packup; exit 1; }; }

# ----------------------------------------------------------------------------------- the steps
models() {  # models ROWS NAME LIMIT [--impl X]
  local rows=$1 name=$2 limit=$3
  shift 3
  step "$name" "$limit" "$PY" tools/benchmark_model.py --device cuda --rows "$rows" "$@" \
    --json "$out/$name.json"
}

train_net() {  # train_net NAME CONFIG LIMIT: a short schedule + evaluation, then --eval-only
  local name=$1 config=$2 limit=$3 dir="$work/$1"
  local short=(MODEL.DEVICE cuda SOLVER.MAX_ITER 100 SOLVER.STEPS "(70,90)" SOLVER.WARMUP_ITERS 20
    DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$dir")
  step "$name" "$limit" env DETECTRON2_DATASETS="$work/datasets" \
    "$PY" train_net.py --num-gpus 1 --config-file "$config" "${short[@]}" &&
    step "${name}_eval" $((limit / 2)) env DETECTRON2_DATASETS="$work/datasets" \
      "$PY" train_net.py --num-gpus 1 --eval-only --config-file "$config" "${short[@]}" \
      MODEL.WEIGHTS "$dir/model_final.pth"
}

run_one() {  # run_one STEP
  local s=$1
  case $s in
    models) need_d2 models && models seed models_seed 150 ;;
    train_net) need_d2 train_net &&
      train_net train_net configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_shapes.yaml 100 ;;
    sanitizer)
      sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      step sanitizer 150 env DCNV2_CUDA_IMPL=cuda "$sanitizer" --tool memcheck --error-exitcode 99 \
        "$PY" -m pytest tests/test_cuda_path.py "${pytest_args[@]}" -v -k \
        "(matches_cpu_float64 and cuda- and float32) or non_contiguous_inputs[cuda] or batch_zero_and_empty_image[cuda]"
      ;;
    mimic) need_d2 mimic &&
      train_net mimic configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml 100 ;;
    d2_tests) need_d2 d2_tests && step d2_tests 90 "$PY" -m pytest tests/test_amp.py \
      "${pytest_args[@]}" "${xdist[@]}" ;;
    triton) step triton 150 "$PY" -m pytest tests/test_triton_mdconv.py \
      tests/test_triton_mdconv_backward.py "${pytest_args[@]}" "${xdist[@]}" -k "cuda or CUDA" ;;
    op_tests) step op_tests 90 "$PY" -m pytest tests/test_cuda_path.py tests/test_determinism.py \
      tests/test_op_errors.py "${pytest_args[@]}" "${xdist[@]}" ;;
    fuzz) step fuzz 90 env DCNV2_FUZZ_EXAMPLES="${DCNV2_FUZZ_EXAMPLES:-60}" "$PY" -m pytest \
      tests/test_fuzz_ops.py "${pytest_args[@]}" -k cuda ;;
    bench_ops)
      # --tf32 and --batch where benchmark_ops.py has them (it records the TF32 setting in the JSON)
      if "$PY" tools/benchmark_ops.py --help 2>/dev/null | grep -q -- --tf32; then
        for spec in "float16 off" "bfloat16 off" "float32 on" "float32 off"; do
          read -r dtype tf32 <<<"$spec"
          step bench_ops 50 "$PY" tools/benchmark_ops.py --device cuda --dtype "$dtype" \
            --tf32 "$tf32" --batch 1,2 --repeat "${GPU_CHECK_REPEAT:-20}" \
            --json "$out/bench_ops_${dtype}_tf32${tf32}.json"
        done
      else
        for dtype in float16 bfloat16 float32; do
          step bench_ops 50 "$PY" tools/benchmark_ops.py --device cuda --dtype "$dtype" \
            --repeat "${GPU_CHECK_REPEAT:-20}" --json "$out/bench_ops_$dtype.json"
        done
      fi
      ;;
    models_more) need_d2 models_more && models dcnv2,mimic models_more 120 ;;
    models_impl)
      need_d2 models_impl || continue
      for impl in cuda triton; do
        models faster_rcnn_R50_FPN_mdconv,mask_rcnn_R50_FPN_mdconv "models_impl_$impl" 60 --impl "$impl"
      done
      ;;
    *) echo "unknown step $s (GPU_CHECK_STEPS)" | tee -a "$summary" ;;
  esac
}

# A word with commas is a group run concurrently (the correctness checks: they share the card and
# do not time anything); a plain word runs alone (the timing steps). When the Triton tests fail
# on the card, the steps after them run the column path (DCNV2_CUDA_IMPL=cuda), so that a broken
# fused kernel costs its own figures only.
for word in $steps; do
  if [[ $word == *,* ]]; then
    pids=()
    for s in ${word//,/ }; do
      (
        bg=1
        run_one "$s"
        rc=$?
        [ $plan = 1 ] || echo $rc >"$out/.rc_$s"
      ) &
      pids+=($!)
    done
    wait "${pids[@]}"
    packup
  else
    run_one "$word"
    rc=$?
    [ $plan = 1 ] || echo $rc >"$out/.rc_$word"
  fi
  if [ $plan = 0 ] && [ -f "$out/.rc_triton" ] && [ "$(cat "$out/.rc_triton")" != 0 ] &&
    [ -z "${DCNV2_CUDA_IMPL:-}" ]; then
    export DCNV2_CUDA_IMPL=cuda
    echo "triton tests failed: the remaining steps run DCNV2_CUDA_IMPL=cuda" | tee -a "$summary"
  fi
done
[ $plan = 1 ] && { echo "budget ${budget}s; the limits above are capped by what is left of it"; exit 0; }
echo "done in $(($(date +%s) - t0)) s: $out" | tee -a "$summary"
packup
