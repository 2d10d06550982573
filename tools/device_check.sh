#!/usr/bin/env bash
# The GPU check (issue 29), for a machine with one CUDA GPU and its own preinstalled PyTorch: nothing is installed,
# this checkout's src/ goes on PYTHONPATH. Under 8 minutes; everything it writes goes into one folder (--out).
#   1. the prefix-kernel tests on the device (tests/test_prefix_kernels.py with NORGA_TEST_DEVICE), if pytest is there;
#   2. benchmarks/gpu_check.py: every fused kernel against the fp64 reference on the device, attention timing, and
#      the suite's step rows as fractions of the device's measured matmul peak;
#   3. the quickstart on the device (needs timm and the quickstart data: --data DIR holding fashion-mnist/).
# `--device cpu` runs the same on the CPU (gpu_check with --quick) to show the script works where no GPU is lent.
#
#   tools/device_check.sh [--device cuda|cpu] [--out DIR] [--data DIR]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
device=cuda out=device_check data=${NORGA_DATA:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    *) echo "device_check.sh: unknown argument $1 (use --device cuda|cpu, --out DIR, --data DIR)" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "device_check.sh: --device is cuda or cpu, not $device" >&2; exit 2 ;; esac
mkdir -p "$out" && out=$(cd "$out" && pwd)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python=${PYTHON:-python}
cd "$root"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to OUT/NAME.txt, note the result
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}

"$python" - >"$out/machine.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    print("no CUDA device")
PY
cat "$out/machine.txt"
: >"$out/summary.txt"

if "$python" -c "import pytest" 2>/dev/null; then
  step prefix_kernel_tests 150 env NORGA_TEST_DEVICE="$device" "$python" -m pytest -q -p no:cacheprovider \
    tests/test_prefix_kernels.py
else
  echo "prefix_kernel_tests: skipped (no pytest in this Python)" | tee -a "$out/summary.txt"
fi

quick=(); [ "$device" = cpu ] && quick=(--quick)
step gpu_check 240 "$python" benchmarks/gpu_check.py --out "$out" --device "$device" "${quick[@]}"

if [ -n "$data" ] && "$python" -c "import timm" 2>/dev/null; then
  step quickstart 240 "$python" -m norga quickstart --quiet --data-root "$data" --output-dir "$out/runs" \
    --set device="$device"
else
  echo "quickstart: skipped (give --data DIR holding fashion-mnist/, and a Python with timm)" | tee -a "$out/summary.txt"
fi
exit $status
