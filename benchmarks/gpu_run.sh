#!/usr/bin/env bash
# Every GPU measurement the README quotes, in one run on a CUDA machine (each step bounded, each log
# kept, a failed step does not stop the others):
#   env        GPU, driver, torch / triton / transformers versions
#   tests      tests/test_kernels.py on CUDA: the compiled kernels against the torch references
#   agreement  benchmarks/backend_agreement.py: the patched model, Triton kernels vs torch references
#   kernels    benchmarks/kernel_speed.py: kernel vs reference time and peak memory
#   prefill    benchmarks/prefill.py on the 0.5b and 7b shapes: baseline vs AIM prefill
#   profile    benchmarks/prefill_profile.py on both shapes: GPU busy time, host syncs, top kernels
#
#   bash benchmarks/gpu_run.sh OUT_DIR [SCALE]
#   STEPS="env prefill_7b" bash benchmarks/gpu_run.sh OUT_DIR     # some steps only
# SCALE multiplies every step's time limit (default 1: about 4 minutes in all on one H200, the
# machine's start not counted).
set -u
out=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR [SCALE]}
scale=${2:-1}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=()
steps=${STEPS:-env tests agreement kernels prefill_05b prefill_7b profile_05b profile_7b}

step() {  # step NAME LIMIT_S COMMAND...: run, log to OUT_DIR/NAME.log, print the rc and the time
  local name=$1 limit=$(( $2 * scale )) start=$SECONDS rc
  shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "    rc=$rc in $(( SECONDS - start )) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step env 30 bash -c "nvidia-smi; $python -c 'import sys, torch, triton, transformers; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); \
print(\"triton\", triton.__version__, \"transformers\", transformers.__version__)'"
step tests 90 "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py
step agreement 60 "$python" benchmarks/backend_agreement.py
step kernels 170 "$python" benchmarks/kernel_speed.py --repeats 5
step prefill_05b 70 "$python" benchmarks/prefill.py --size 0.5b
step prefill_7b 140 "$python" benchmarks/prefill.py --size 7b --repeats 3
step profile_05b 60 "$python" benchmarks/prefill_profile.py --size 0.5b
step profile_7b 90 "$python" benchmarks/prefill_profile.py --size 7b

echo
for name in $steps; do
  [ -f "$out/$name.log" ] || continue
  echo "--- $name"
  case $name in
    env) tail -n 3 "$out/$name.log" ;;
    tests) tail -n 2 "$out/$name.log" ;;
    *) tr '\r' '\n' < "$out/$name.log" | grep -v "cases: \|^ *$" | tail -n 40 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
