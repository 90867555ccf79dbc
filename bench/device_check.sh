#!/usr/bin/env bash
# The whole GPU check in one command: build, test, sanitize, benchmark, profile and sweep; logs
# and JSON go to OUTDIR (at most 8 files); a short table is printed last. Steps run in order of
# what decides first (build, GPU tests, the split guard, the benchmarks with both baselines,
# sanitizers, the profile, ncu, training step, sweep); each gets at most the time left before a
# deadline, so the run ends within 8 minutes with its logs and the step list (the sweep, last,
# runs only in what is left, or with a later deadline).
#   usage: bench/device_check.sh OUTDIR
#   GSP_DEADLINE_S          seconds after which no step starts or runs on (default 470: the whole
#                           check within 8 minutes; up to ~560 stays under 10 minutes)
#   GSP_BENCH_ARGS          arguments of the first `gsp-kernels bench` (default: target shape and B=64,
#                           paper baseline, every backend with both Triton strategies side by side
#                           (triton:fused, triton:gemm) plus cuda@tf32x3 and triton:fused@ieee)
#   GSP_COMPILE_BENCH_ARGS  arguments of the second, with torch.compile ("" skips it)
#   GSP_SKIP_TRAINING_STEP=1  skip the ResNet-50 training-step benchmark
#   GSP_RUN_CHECK=1         also run `gsp-kernels check` (the GPU tests cover the same ground)
#   GSP_SKIP_PROFILE=1      skip bench/profile_backends.py (per-kernel GPU time, host-side time,
#                           Triton split vs one program per sample, register cap vs none)
#   GSP_SKIP_NCU=1          skip Nsight Compute (speed of light, occupancy) on bench/ncu_case.py
#   GSP_SWEEP_BUDGET_S      seconds for bench/sweep_triton.py's strategy and tile sweep at the target
#                           shape (default 90, or what the deadline leaves; 0 skips it); a strategy-only
#                           sweep at B=64 follows in what is left
#   GSP_COMMIT              the commit being measured (the device's copy has no .git), recorded in
#                           tuned_config.json: run as GSP_COMMIT=$(git rev-parse --short HEAD) here
# Files (8 at most): env_build.log (environment, build, Triton register report), tests.log (tests,
# the split-sample guard, sanitizers, check), bench.log (benchmarks, ncu, training step, profile,
# sweep tables), bench.json, bench_compile.json, train_step.json, sweep.json, and tuned_config.json
# (the sweep's winners as a tuned-configuration file for this GPU, gsp_kernels/backends/triton/
# tuning.py: copy it into gsp_kernels/backends/triton/tuned_configs/ under the name it records,
# tuning.config_filename).
set -uo pipefail
out=${1:?usage: bench/device_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export GSP_CUDA_ARCHS=${GSP_CUDA_ARCHS:-90-real;90-virtual}
py=${PYTHON:-python3}
t0=$(date +%s)
deadline=${GSP_DEADLINE_S:-470}
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
time_left() { echo $(( deadline - ($(date +%s) - t0) )); }
status=()
record() { status+=("$(printf '%-22s %s' "$1" "$2")"); }
run_step() {  # run_step NAME LOG TIMEOUT CMD...: append to LOG, record pass/fail, return CMD's status
  local name=$1 log=$2 limit=$3 rc=0 left; shift 3
  left=$(time_left)
  if [ "$left" -lt 20 ]; then
    stamp "$name: skipped, deadline" | tee -a "$log"
    record "$name" "SKIPPED (deadline)"
    return 125
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  stamp "$name (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then record "$name" ok; else record "$name" "FAIL (rc=$rc)"; fi
  return "$rc"
}

env_log=$out/env_build.log
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
  $py -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} >"$env_log" 2>&1
run_step build "$env_log" 300 $py -m pip install --no-build-isolation --no-deps -e .
run_step info "$env_log" 60 $py -m gsp_kernels info

# Registers and shared memory of every Triton kernel variant as this Triton version builds it
# for sm_90 (CPU-only compiles, in the background during the GPU tests): the occupancy that
# NOTES.md's predictions assume (measured there with the CI machine's Triton).
registers_tmp=$(mktemp)
( cd python_tests && timeout 300 env -u TRITON_INTERPRET $py -c \
    "import test_triton; print('\n'.join(test_triton._compile_kernels_for_sm90()))" ) >"$registers_tmp" 2>&1 &
registers_pid=$!

test_log=$out/tests.log
# -v: each test's result is in the log as it finishes, even if the step runs out of time.
run_step "pytest -m gpu" "$test_log" 270 $py -m pytest python_tests -m gpu -v --tb=short -rfE --timeout 120 -p no:cacheprovider
# The split samples' atomic ticket cannot be checked under the CPU interpreter: if the guard finds
# results that move between runs or miss the reference, everything timed below uses the fallback
# (one Triton program per sample) and the step list says so.
if ! run_step split-guard "$test_log" 150 $py bench/split_guard.py; then
  export GSP_TRITON_SPLIT=0
  record split-fallback "GSP_TRITON_SPLIT=0 for the timings"
fi
if wait "$registers_pid"; then record triton-registers ok; else record triton-registers FAIL; fi
{ echo "== Triton kernels built for sm_90: registers, stack (spills), shared memory =="; grep -v -i warn "$registers_tmp"; } >>"$env_log"
rm -f "$registers_tmp"

bench_log=$out/bench.log
# Every backend and the paper's algorithm side by side at the target shape, then the same with the
# torch.compile baseline added (the issues' targets are ratios to both).
read -r -a bench_args <<<"${GSP_BENCH_ARGS:---shapes 256x196x512x128,64x49x512x64 --baselines paper --backends cuda,cuda@tf32x3,triton:fused,triton:gemm,triton:fused@ieee,reference}"
run_step bench "$bench_log" 150 $py -m gsp_kernels bench "${bench_args[@]}" --json "$out/bench.json"
if [ -n "${GSP_COMPILE_BENCH_ARGS-x}" ]; then
  read -r -a compile_args <<<"${GSP_COMPILE_BENCH_ARGS:---shapes 256x196x512x128 --baselines paper,compile}"
  run_step bench-compile "$bench_log" 150 $py -m gsp_kernels bench "${compile_args[@]}" --json "$out/bench_compile.json"
fi

san_log=$test_log
if command -v compute-sanitizer >/dev/null && [ -f bench/sanitizer_case.py ]; then
  # Only this project's kernels (CUDA and Triton names contain "gsp"): torch's stay unchecked.
  for tool in memcheck racecheck synccheck; do
    run_step "$tool" "$san_log" 180 compute-sanitizer --tool "$tool" --kernel-name kns=gsp \
      --error-exitcode 3 $py bench/sanitizer_case.py
  done
fi

if [ "${GSP_SKIP_PROFILE:-0}" != "1" ]; then
  run_step profile "$bench_log" 180 $py bench/profile_backends.py
fi
# Hardware counters of one forward+backward per backend and dtype: what bounds each kernel (ours, and
# the cuBLAS GEMMs of the Triton gemm strategy).
# ncu cannot read them on every container runtime (no access to the performance counters); a
# failure costs one line.
if [ "${GSP_SKIP_NCU:-0}" != "1" ] && command -v ncu >/dev/null; then
  run_step ncu "$bench_log" 150 ncu --clock-control none --profile-from-start off --nvtx \
    --kernel-name-base demangled --kernel-name "regex:gsp|gemm|nvjet|xmma|cutlass" --section SpeedOfLight --section Occupancy \
    --section LaunchStats $py bench/ncu_case.py
fi

if [ "${GSP_SKIP_TRAINING_STEP:-0}" != "1" ]; then
  run_step training-step "$bench_log" 150 $py -m gsp_kernels.bench.training_step --json "$out/train_step.json"
fi

sweep_budget=${GSP_SWEEP_BUDGET_S:-90}
if [ "$sweep_budget" != 0 ]; then
  # The sweep stops itself at its budget; leave it a minute to finish its last config and write.
  fit=$(( $(time_left) - 60 ))
  [ "$fit" -lt "$sweep_budget" ] && sweep_budget=$fit
  if [ "$sweep_budget" -ge 20 ]; then
    run_step sweep "$bench_log" $(( sweep_budget + 60 )) $py bench/sweep_triton.py \
      --budget-s "$sweep_budget" --json "$out/sweep.json" --write-config "$out/tuned_config.json"
    # The strategy at a common metric-learning batch, merged into the same file.
    if [ "$(time_left)" -ge 60 ]; then
      run_step sweep-b64 "$bench_log" $(( $(time_left) - 10 )) $py bench/sweep_triton.py --shape 64x49x512x64 \
        --kernels strategy --budget-s $(( $(time_left) - 40 )) --write-config "$out/tuned_config.json"
    else
      record sweep-b64 "SKIPPED (deadline)"
    fi
  else
    record sweep "SKIPPED (deadline)"
  fi
fi
if [ "${GSP_RUN_CHECK:-0}" = "1" ]; then
  run_step check "$test_log" 120 $py -m gsp_kernels check
fi

stamp "done"
echo "== tail of the benchmark table =="
tail -n 40 "$bench_log"
echo "== failures in tests (if any) =="
grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$test_log" | tail -n 25
echo "== steps =="
printf '%s\n' "${status[@]}"
