#!/usr/bin/env bash
# The GPU check, in two phases, each meant for one device call. Steps run one at a time (no two
# compile or autotune kernels at once), each under its own time limit, capped by what is left of
# the phase's budget; a step whose time is gone is skipped and says so. Each step writes
# OUTDIR/NAME.log (and its JSON) as it finishes and a line to OUTDIR/summary.txt: exit status,
# seconds, limit, and on failure the last lines of its log.
#
#   tools/gpu_check.sh [--phase user|cost] OUTDIR   # e.g. tools/gpu_check.sh --phase user "$OUT"
#   tools/gpu_check.sh --plan                       # both phases' steps, limits and totals
#   tools/gpu_check.sh --dry-run --phase user OUTDIR  # = GPU_CHECK_DEVICE=cpu: the rehearsal
#
# Phase `user` (480 s, first): the extension built for the card, then what a user runs first:
# train_net.py --num-gpus 1 on the quick mdconv+mdpool Mask R-CNN and on its mimicking twin (short
# schedule, COCOEvaluator at the end), --eval-only on the checkpoint (its copypaste lines must equal
# the final evaluation's), --resume to a later iteration (the log must start at the saved one),
# the checkpoint evaluated on CUDA and CPU by tools/compare_devices.py; then the CUDA test suite
# (every test whose skipif names CUDA), the Triton tests (DCNV2_CUDA_IMPL=triton), compute-sanitizer
# memcheck of both ops on the column path and of the fused kernels, racecheck of the fused (Triton,
# shared-memory) kernels, the fuzz suite on CUDA.
# Phase `cost` (360 s): issue 23's measurements: the profile, the model benchmark, the op benchmark.
#
# GPU_CHECK_DEVICE=cpu (or --dry-run): no build, no CUDA; the train_net steps run with tiny
# settings (64-px images, a few iterations, GPU_CHECK_VAL_IMAGES=8 validation images), the test
# steps with a tiny selection (they skip for want of CUDA, which shows what they select), the
# sanitizer steps are skipped ("needs a GPU"). tests/test_gpu_check.py runs it.
#
# Environment: GPU_CHECK_PHASE (user), GPU_CHECK_DEVICE (cuda), GPU_CHECK_BUDGET (the phase's),
# GPU_CHECK_SLACK (limits and budget multiplied by it: 1 on CUDA, 4 on CPU),
# GPU_CHECK_WORK (checkpoints and data set: $TMPDIR/gpu_check_work), GPU_CHECK_VAL_IMAGES (0 = all),
# GPU_CHECK_WHEELS (.gpu_wheels, made by dev/prepare_gpu_wheels.py; installed when detectron2 does
# not import), GPU_CHECK_ARCH (the card's compute capability), PYTHON (python3), MAX_JOBS (nproc).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=run
phase=${GPU_CHECK_PHASE:-user}
dev=${GPU_CHECK_DEVICE:-cuda}
out=
while [ $# -gt 0 ]; do
  case $1 in
    --plan) mode=plan ;;
    --dry-run) dev=cpu ;;
    --phase) phase=${2:?--phase: expected user or cost}; shift ;;
    user | cost) phase=$1 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
case $phase in user | cost) ;; *) echo "GPU_CHECK_PHASE: expected user or cost, got '$phase'" >&2; exit 2 ;; esac
case $dev in cuda | cpu) ;; *) echo "GPU_CHECK_DEVICE: expected cuda or cpu, got '$dev'" >&2; exit 2 ;; esac
declare -A PHASE_BUDGET=([user]=480 [cost]=360)

PY=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu_check_work}
wheels=${GPU_CHECK_WHEELS:-.gpu_wheels}
site=$work/site
declare -A rcs=()  # step -> exit status
total=0

if [ $mode = plan ]; then
  summary=/dev/null out=OUTDIR
else
  [ -n "$out" ] || { echo "usage: tools/gpu_check.sh [--phase user|cost] [--dry-run] OUTDIR | --plan" >&2; exit 2; }
  mkdir -p "$out" "$work" && out=$(cd "$out" && pwd) && work=$(cd "$work" && pwd)
  summary=$out/summary.txt
  : >"$summary"
fi
note() { echo "$*" | tee -a "$summary"; }

# step NAME LIMIT CMD...: CMD under the smaller of LIMIT and what is left of the budget; its output
# goes to OUTDIR/NAME.log, a line to summary.txt (on failure with the log's last lines).
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  if [ $mode = plan ]; then
    local cmd="$*"
    cmd=${cmd//$'\n'/ }
    [ ${#cmd} -gt 160 ] && cmd="${cmd:0:157}..."
    printf '  %-26s %4s s  %s\n' "$name" "$limit" "$cmd"
    total=$((total + limit))
    return 0
  fi
  limit=$((limit * slack))
  left=$((budget - ($(date +%s) - t0)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    note "$name: skipped, ${left} s of the ${budget} s budget left"
    rcs[$name]=skipped
    return 1
  fi
  start=$(date +%s)
  echo "### [limit ${limit} s] $*" >"$out/$name.log"
  timeout -k 10 "$limit" "$@" >>"$out/$name.log" 2>&1
  rc=$?
  rcs[$name]=$rc
  local cmd="$*"
  cmd=${cmd//$'\n'/ }
  [ ${#cmd} -gt 300 ] && cmd="${cmd:0:297}..."
  note "$name: rc=$rc, $(($(date +%s) - start)) s (limit $limit): $cmd"
  # pytest's last line (counts of passed, failed, skipped) and compute-sanitizer's verdict
  grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)|ERROR SUMMARY:' "$out/$name.log" |
    tail -n 2 | sed 's/^/  /' | tee -a "$summary"
  if [ $rc != 0 ]; then
    [ $rc = 124 ] && note "  (cut by its time limit)"
    tail -n 15 "$out/$name.log" | sed 's/^/  | /' >>"$summary"
  fi
  return $rc
}
# after STEP NAME: true when STEP exited 0 (or in --plan); otherwise NAME is noted as skipped.
after() {
  [ $mode = plan ] || [ "${rcs[$1]:-}" = 0 ] && return 0
  note "$2: skipped, $1 did not succeed (rc=${rcs[$1]:-not run})"
  rcs[$2]=skipped
  return 1
}
# gpu_only NAME: false on CPU (NAME noted as needing a GPU).
gpu_only() {
  [ $mode = plan ] || [ "$dev" = cuda ] && return 0
  note "$1: skipped, needs a GPU"
  return 1
}

# pytest: failures kept (-ra: a line for every skip and failure with its reason; --tb=short).
# -p cuda_only (written below): only the tests a skipif mark naming CUDA would skip without one.
pytest_args=(-q -ra --tb=short -p no:cacheprovider --durations=5)
cuda_only=(-p cuda_only --continue-on-collection-errors)

# ------------------------------------------------------------------------------- environment
if [ $mode = run ]; then
  t0=$(date +%s)
  # the CPU rehearsal: each limit (and the budget) times GPU_CHECK_SLACK (4 on CPU)
  slack=${GPU_CHECK_SLACK:-$([ "$dev" = cpu ] && echo 4 || echo 1)}
  budget=${GPU_CHECK_BUDGET:-$((PHASE_BUDGET[$phase] * slack))}
  note "gpu_check.sh: phase $phase on $dev, budget $budget s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  rm -rf "$work"/{train,eval_only,mimic,resume,compare,plugins}
  mkdir -p "$work/plugins"
  cat >"$work/plugins/cuda_only.py" <<'EOF'
"""pytest -p cuda_only: keep only the tests that a skipif mark whose reason names CUDA would skip
on a machine without a CUDA device (written by tools/gpu_check.sh)."""
import re


def pytest_collection_modifyitems(config, items):
    def wants_cuda(item):
        return any(
            re.search("cuda", str(m.kwargs.get("reason", "")), re.IGNORECASE)
            for m in item.iter_markers("skipif")
        )

    keep = [item for item in items if wants_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not wants_cuda(item)])
    items[:] = keep
EOF
  if [ "$dev" = cuda ]; then
    {
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      command -v nvcc && nvcc --version | tail -2
      command -v compute-sanitizer
    } >"$out/machine.txt" 2>&1
  else
    lscpu >"$out/machine.txt" 2>&1
  fi
  "$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'CUDA device:', torch.cuda.is_available() and torch.cuda.get_device_name())" >>"$out/machine.txt" 2>&1
fi

# the package is used from the source tree (built in place), not installed
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD:$work/plugins:$site${PYTHONPATH:+:$PYTHONPATH}"

# prepare: the carried wheels where detectron2 does not import, the build for the card (CUDA only)
prepare() {
  [ $mode = plan ] || [ "$dev" = cuda ] || return 0
  if [ $mode = plan ] || ! "$PY" -c "import detectron2" 2>/dev/null; then
    [ $mode = run ] && rm -rf "$site" && mkdir -p "$site"
    step wheels 15 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  fi
  if [ $mode = run ]; then
    "$PY" -c "import detectron2; print('detectron2', detectron2.__version__, detectron2.__file__)" >>"$out/machine.txt" 2>&1
    if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
      note "no CUDA device visible to $PY: nothing built, no step run (GPU_CHECK_DEVICE=cpu rehearses on CPU)"
      exit 2
    fi
  fi
  local arch=${GPU_CHECK_ARCH:-"<the card's>"}
  [ $mode = run ] && arch=${GPU_CHECK_ARCH:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  # one architecture, the card's: the default list (every one torch was built for) would
  # multiply the build time
  step build 50 env DCNV2_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py build_ext --inplace ||
    { note "build failed: no step run"; exit 1; }
}

# ------------------------------------------------------------------------------ phase user
QUICK=configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_shapes.yaml
MIMIC=configs/quick_schedules/mask_rcnn_R50_FPN_dcnv2_mimic_shapes.yaml
if [ "$dev" = cuda ]; then
  iters=60 more=70 val=${GPU_CHECK_VAL_IMAGES:-0}
  sched=(SOLVER.MAX_ITER $iters SOLVER.STEPS "(40,50)" SOLVER.WARMUP_ITERS 20 SOLVER.CHECKPOINT_PERIOD 30)
  tiny=()
  threads=(--devices cuda,cpu)
  # the files with a skipif whose reason names CUDA (the fuzz and Triton files have steps of their own)
  mapfile -t cuda_tests < <(grep -liE 'reason=.*cuda' tests/test_*.py | grep -v -e fuzz -e triton -e gpu_check)
  triton_tests=(tests/test_triton_mdconv.py tests/test_triton_mdconv_backward.py)
else
  iters=4 more=6 val=${GPU_CHECK_VAL_IMAGES:-8}
  sched=(SOLVER.MAX_ITER $iters SOLVER.STEPS "(3,)" SOLVER.WARMUP_ITERS 2 SOLVER.CHECKPOINT_PERIOD 2)
  # 64-px images, few proposals and RoIs, two images a step, every box kept (random weights
  # score below the 0.05 default)
  tiny=(INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64
    MODEL.RPN.PRE_NMS_TOPK_TRAIN 200 MODEL.RPN.POST_NMS_TOPK_TRAIN 64 MODEL.RPN.PRE_NMS_TOPK_TEST 50
    MODEL.RPN.POST_NMS_TOPK_TEST 10 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 SOLVER.IMS_PER_BATCH 2
    MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 TEST.DETECTIONS_PER_IMAGE 20)
  threads=(--devices cpu,cpu --threads 1,2)
  cuda_tests=(tests/test_op_errors.py tests/test_determinism.py)
  triton_tests=(tests/test_triton_mdconv_backward.py)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
data=(env DETECTRON2_DATASETS="$work/datasets")
train_net=("${data[@]}" "$PY" train_net.py --num-gpus 1)
opts=(MODEL.DEVICE "$dev" "${tiny[@]}" "${sched[@]}")

# copypaste LOG: Detectron2's copypaste lines of the last evaluation in LOG (bbox and segm)
copypaste() { grep -o 'copypaste: .*' "$1" 2>/dev/null | tail -n 6; }

# check NAME OK DETAIL...: a verdict line in the summary (no command, no limit)
check() {
  local name=$1 ok=$2
  shift 2
  [ $mode = plan ] && { printf '  %-26s    -    %s\n' "$name" "$*"; return 0; }
  if [ "$ok" = 1 ]; then note "$name: PASS $1"; rcs[$name]=0; else note "$name: FAIL $1"; rcs[$name]=1; fi
  shift
  for line in "$@"; do note "  $line"; done
}

user_phase() {
  step data 15 "${data[@]}" "$PY" -c "
import json, os, sys
from projects_dcnv2.data.shapes import generate_shapes_dataset
root, n = generate_shapes_dataset(), $val
path = os.path.join(root, 'annotations', 'instances_val.json')
coco = json.load(open(path))
if n and len(coco['images']) > n:  # the first n validation images only (a rehearsal)
    coco['images'] = coco['images'][:n]
    keep = {im['id'] for im in coco['images']}
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in keep]
    json.dump(coco, open(path, 'w'))
print(root, len(coco['images']), 'validation images')"

  step train 50 "${train_net[@]}" --config-file $QUICK "${opts[@]}" OUTPUT_DIR "$work/train"
  if after train eval_only; then
    step eval_only 25 "${train_net[@]}" --eval-only --config-file $QUICK "${opts[@]}" \
      MODEL.WEIGHTS "$work/train/model_final.pth" OUTPUT_DIR "$work/eval_only"
    if [ $mode = plan ]; then
      check ap_equal - "the copypaste lines of train.log's final evaluation == eval_only.log's"
    else
      local a b
      a=$(copypaste "$out/train.log") b=$(copypaste "$out/eval_only.log")
      if [ -n "$a" ] && [ "$a" = "$b" ]; then
        check ap_equal 1 "--eval-only on model_final.pth prints the final evaluation's copypaste lines" \
          "train = eval_only: ${a//$'\n'/$'\n  train = eval_only: '}"
      else
        check ap_equal 0 "--eval-only's copypaste lines differ from the final evaluation's (or are missing)" \
          "train: ${a//$'\n'/$'\n  train: '}" "eval_only: ${b//$'\n'/$'\n  eval_only: '}"
      fi
    fi
  fi

  step mimic 45 "${train_net[@]}" --config-file $MIMIC "${opts[@]}" OUTPUT_DIR "$work/mimic"
  if [ $mode = run ] && [ "${rcs[mimic]}" = 0 ]; then
    local m
    m=$(copypaste "$out/mimic.log")
    note "  mimic: ${m//$'\n'/$'\n  mimic: '}"
  fi

  if after train resume; then
    # a copy of the training folder, so that the checkpoint compared below stays as trained
    [ $mode = run ] && mkdir -p "$work/resume" && cp "$work/train"/{model_final.pth,last_checkpoint} "$work/resume/"
    step resume 35 "${train_net[@]}" --resume --config-file $QUICK "${opts[@]}" SOLVER.MAX_ITER $more \
      OUTPUT_DIR "$work/resume"
    if [ $mode = plan ]; then
      check resume_continues - "resume.log: 'Starting training from iteration $iters', then iteration $((more - 1)) saved"
    else
      local start
      start=$(grep -o 'Starting training from iteration [0-9]*' "$out/resume.log" | head -n 1)
      local saved
      saved=$("$PY" -c "import torch; print(torch.load('$work/resume/model_final.pth', map_location='cpu', weights_only=False)['iteration'])" 2>/dev/null)
      [ "$start" = "Starting training from iteration $iters" ] && [ "$saved" = $((more - 1)) ]
      check resume_continues $((1 - $?)) "--resume from iteration $iters (the saved one) to $more" \
        "resume.log: '${start:-no start line}'; model_final.pth after it: iteration ${saved:-?}"
    fi
  fi

  if after train compare; then
    step compare 85 "${data[@]}" "$PY" tools/compare_devices.py --config-file $QUICK "${threads[@]}" --images 4 \
      --json "$out/compare.json" "${opts[@]:2}" MODEL.WEIGHTS "$work/train/model_final.pth"
    [ $mode = run ] && note "  $(grep -h 'compare_devices: ' "$out/compare.log" | tail -n 1)"
  fi

  # the CUDA test suite: every test whose skipif names CUDA (the Triton and fuzz files apart)
  step cuda_tests 45 "$PY" -m pytest "${cuda_tests[@]}" "${pytest_args[@]}" "${cuda_only[@]}"
  step triton_tests 35 env DCNV2_CUDA_IMPL=triton "$PY" -m pytest "${triton_tests[@]}" \
    "${pytest_args[@]}" "${cuda_only[@]}"

  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  local column_cases="(matches_cpu_float64 and cuda- and float32) or non_contiguous_inputs[cuda] or batch_zero_and_empty_image[cuda]"
  local fused_cases="(cpu_float64 and cuda-awkward-float32) or non_contiguous_inputs or batch_zero"
  local fused_files=(tests/test_triton_mdconv.py tests/test_triton_mdconv_backward.py)
  # both ops (mdconv, mdpool) on the column path; the fused (Triton) mdconv forward and backward
  gpu_only memcheck && step memcheck 25 env DCNV2_CUDA_IMPL=cuda "$sanitizer" --tool memcheck \
    --error-exitcode 99 "$PY" -m pytest tests/test_cuda_path.py "${pytest_args[@]}" -k "$column_cases"
  gpu_only memcheck_fused && step memcheck_fused 20 env DCNV2_CUDA_IMPL=triton "$sanitizer" \
    --tool memcheck --error-exitcode 99 "$PY" -m pytest "${fused_files[@]}" "${pytest_args[@]}" \
    "${cuda_only[@]}" -k "$fused_cases"
  # the Triton kernels stage tiles in shared memory (the .cu kernels use none)
  gpu_only racecheck && step racecheck 20 env DCNV2_CUDA_IMPL=triton "$sanitizer" --tool racecheck \
    --error-exitcode 99 "$PY" -m pytest "${fused_files[@]}" "${pytest_args[@]}" "${cuda_only[@]}" \
    -k "$fused_cases"

  step fuzz 15 env DCNV2_FUZZ_EXAMPLES="${DCNV2_FUZZ_EXAMPLES:-$([ "$dev" = cuda ] && echo 30 || echo 2)}" \
    "$PY" -m pytest tests/test_fuzz_ops.py "${pytest_args[@]}" -k cuda
}

# ------------------------------------------------------------------------------ phase cost
cost_phase() {
  if [ "$dev" = cpu ]; then  # the rehearsal: the same commands at toy sizes
    local toy=(--size 64x96 --objects 2 --warmup 0 --iters 1)
    local profile_extra=("${toy[@]}") model_extra=("${toy[@]}" --memory off --modes infer)
    local ops_extra=(--repeat 1 --stages c5 --no-onnxruntime)
  else
    local profile_extra=() model_extra=() ops_extra=()
  fi
  # ==================== the measurement commands (issue 23): adjust flags here ====================
  if [ -f tools/profile_model.py ] || [ $mode = plan ]; then
    step profile 50 "$PY" tools/profile_model.py --device "$dev" "${profile_extra[@]}" --json "$out/profile.json"
  else
    note "profile: skipped, tools/profile_model.py is not in this tree"
  fi
  step models_seed 75 "$PY" tools/benchmark_model.py --device "$dev" --rows seed "${model_extra[@]}" \
    --json "$out/models_seed.json"
  step models_dcnv2 40 "$PY" tools/benchmark_model.py --device "$dev" --rows mask_rcnn_R50_FPN_dcnv2 \
    "${model_extra[@]}" --json "$out/models_dcnv2.json"
  for spec in "float16 on" "bfloat16 on" "float32 on" "float32 off"; do
    read -r dtype tf32 <<<"$spec"
    if [ "$dev" = cpu ] && [ "$dtype" != float32 ]; then  # the CPU op computes float32 and float64
      note "bench_ops_${dtype}_tf32$tf32: skipped, needs a GPU"
      continue
    fi
    step "bench_ops_${dtype}_tf32$tf32" 30 "$PY" tools/benchmark_ops.py --device "$dev" --dtype "$dtype" \
      --tf32 "$tf32" --batch 1,2 --repeat 20 "${ops_extra[@]}" --json "$out/bench_ops_${dtype}_tf32$tf32.json"
  done
  # ================================================================================================
}

if [ $mode = plan ]; then
  for phase in user cost; do
    total=0
    echo "phase $phase (one device call; budget ${PHASE_BUDGET[$phase]} s; steps run one at a time, in this order):"
    prepare
    ${phase}_phase
    echo "  total of the limits: $total s of the ${PHASE_BUDGET[$phase]} s budget"
    [ $total -le "${PHASE_BUDGET[$phase]}" ] || echo "  OVER BUDGET"
  done
  exit 0
fi
prepare
${phase}_phase
failed=$(for k in "${!rcs[@]}"; do [ "${rcs[$k]}" = 0 ] || [ "${rcs[$k]}" = skipped ] || echo "$k"; done | sort | tr '\n' ' ')
note "done in $(($(date +%s) - t0)) s; failed: ${failed:-none}"
[ -z "$failed" ]
