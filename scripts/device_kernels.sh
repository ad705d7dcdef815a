#!/usr/bin/env bash
# The state-kernel and GEMM measurements of issues 13 and 14 in one device call (about 6 minutes):
#   scripts/device_kernels.sh        (on the GPU machine, after installing the wheels: see device_runtime.sh)
# Writes $OUT/kernels.txt as it goes: the GPU tests of the new kernels, the state update alone for
# both families (every kernel form and knob), and the GEMM table.
set -uo pipefail
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/kernels.txt"
{
  echo "## GPU tests: state kernels (both families), act quant, half precision"
  timeout 240 python3 -m pytest -q -x -m gpu tests/test_kernels_state_update.py tests/test_kernels_act_quant.py \
    tests/test_gpu_half_precision.py -p no:cacheprovider 2>&1 | tail -5
  echo "## Mamba-2 state update, mamba2-2.7b shape"
  timeout 120 python3 scripts/bench_state_update.py --batch 1,64,128
  echo "## Mamba-1 state update, mamba-2.8b shape"
  timeout 60 python3 scripts/bench_state_update.py --batch 1,64,128 --mamba1 5120 --dstate 16
  echo "## GEMMs"
  timeout 240 python3 scripts/bench_gemm.py --m 1,16,2048,8192
} >> "$log" 2>&1
