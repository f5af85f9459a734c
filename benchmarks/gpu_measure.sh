#!/usr/bin/env bash
# GPU measurements of EVE pre-training speed: one script per session on a GPU machine, results under OUT_DIR.
#
#   benchmarks/gpu_measure.sh OUT_DIR measure   # GPU tests, region profile of MSM, the MSM and
#                                               # MLM+ITC+ITM+MIM rows at micro-batch 64 with each expert
#                                               # implementation (before / after)
#   benchmarks/gpu_measure.sh OUT_DIR table1    # the six Table-1 rows, largest micro-batch searched
#   benchmarks/gpu_measure.sh OUT_DIR settings  # the step's settings, one after the other (before: default):
#                                               # eve-profile (regions, engine split, ops), the sync warnings
#                                               # of 5 steps (set_sync_debug_mode warn), the MSM and
#                                               # MLM+ITC+ITM+MIM rows at micro-batch BATCH
#
# SETTINGS (default: all, in this order) picks the settings of the `settings` phase:
#   default   the defaults (attention sdpa_bias, DeepSpeed MoE, DeepSpeed norm, eager)
#   sdpa      rel_pos_bias=false (the official config's) + attention_kernel=sdpa: SDPA without a float mask
#   flex      attention_kernel=flex: the relative position bias as FlexAttention's score_mod
#   grouped   moe_dispatch=grouped + zero_grad_norm=foreach: no host sync in the step
#   compile   grouped + train.compile=blocks (Inductor; the first steps compile)
#   all       compile + flex;  all-sdpa: compile + sdpa
#   graphs    all-sdpa + train.compile_mode=reduce-overhead (each compiled block replayed as a CUDA graph)
#
# MODEL (default eve_base), DEVICE (default cuda), BATCH (default 64) and PYTHON (default python3) may be
# set to try the script on a CPU with a tiny model first:
#   MODEL=eve_tiny DEVICE=cpu BATCH=4 benchmarks/gpu_measure.sh /tmp/gpu measure
# Every step has its own time limit; a failed step is logged and the script goes on, so one slow or broken
# step does not lose the others' numbers. Output: OUT_DIR/measure.log or table1.log plus JSON/markdown.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_measure.sh OUT_DIR measure|table1|settings}
phase=${2:-measure}
MODEL=${MODEL:-eve_base}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/$phase.log"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log its output and its exit status
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e "^\[.*real_accelerator" -e "UserWarning" | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

if [ "$DEVICE" = cuda ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$gpu" in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
  step 30 nvidia-smi nvidia-smi
else
  tag=cpu-smoke
fi
bench=("$PYTHON" -m eve_ds.cli.bench --model "$MODEL" --device "$DEVICE")
profile=("$PYTHON" -m eve_ds.cli.profile --model "$MODEL" --device "$DEVICE" --batch-size "$BATCH")

setting_args() {  # setting_args NAME: the eve-profile / eve-bench options of one setting
  local grouped="--set moe_dispatch=grouped --zero-grad-norm foreach"
  case "$1" in
    default) echo "" ;;
    sdpa) echo "--set rel_pos_bias=false --set attention_kernel=sdpa" ;;
    flex) echo "--set attention_kernel=flex" ;;
    grouped) echo "$grouped" ;;
    compile) echo "$grouped --compile blocks" ;;
    all) echo "$grouped --compile blocks --set attention_kernel=flex" ;;
    all-sdpa) echo "$grouped --compile blocks --set rel_pos_bias=false --set attention_kernel=sdpa" ;;
    graphs) echo "$grouped --compile blocks --compile-mode reduce-overhead --set rel_pos_bias=false --set attention_kernel=sdpa" ;;
    *) echo "unknown setting $1" >&2; return 1 ;;
  esac
}

case "$phase" in
  measure)
    if [ "$DEVICE" = cuda ]; then
      step 240 gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    fi
    step 200 profile-msm "$PYTHON" -m eve_ds.cli.profile --model "$MODEL" --batch-size "$BATCH" \
      --task-set mlm,mim_pixel --device "$DEVICE" --ops --top 30 --json "$out/profile-msm-$tag.json"
    for impl in loop stacked; do
      step 200 "fixed-batch-$impl" "${bench[@]}" --batch-size "$BATCH" --set expert_impl=$impl \
        --task-sets mlm,mim_pixel mlm,itc,itm,mim_pixel --warmup-steps 3 --windows 5 --steps-per-window 5 \
        --json "$out/fixed$BATCH-$impl-$tag.json" --markdown "$out/fixed$BATCH-$impl-$tag.md"
    done
    ;;
  table1)
    step 540 table1 "${bench[@]}" --max-batch-limit 1024 --batch-granularity 16 \
      --warmup-steps 3 --windows 5 --steps-per-window 5 \
      --json "$out/table1-$tag.json" --markdown "$out/table1-$tag.md"
    ;;
  settings)
    if [ "$DEVICE" = cuda ]; then
      step 240 gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    fi
    for name in ${SETTINGS:-default sdpa flex grouped compile all all-sdpa graphs}; do
      opts=$(setting_args "$name") || continue
      # shellcheck disable=SC2086  # the options are words
      step 240 "profile-$name" "${profile[@]}" --task-set mlm,mim_pixel --ops --top 30 --steps 3 $opts \
        --json "$out/profile-$name-$tag.json"
      if [ "$DEVICE" = cuda ]; then
        # shellcheck disable=SC2086
        step 200 "syncs-$name" "${profile[@]}" --task-set mlm,mim_pixel --sync-warn 5 $opts \
          --json "$out/syncs-$name-$tag.json"
      fi
      # shellcheck disable=SC2086
      step 240 "rows-$name" "${bench[@]}" --batch-size "$BATCH" --task-sets mlm,mim_pixel mlm,itc,itm,mim_pixel \
        --warmup-steps 3 --windows 5 --steps-per-window 5 $opts \
        --json "$out/fixed$BATCH-$name-$tag.json" --markdown "$out/fixed$BATCH-$name-$tag.md"
    done
    ;;
  *)
    echo "unknown phase $phase (measure | table1 | settings)" >&2
    exit 2
    ;;
esac
