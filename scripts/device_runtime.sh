#!/usr/bin/env bash
# Decode-runtime speed on the GPU machine (device tool), for issue 13. Usage:
#   scripts/device_runtime.sh SHAPE [BATCHES] [VARIANTS]
#   (SHAPE: mamba2-2.7b | mamba-2.8b; BATCHES default 1,64; VARIANTS default "h4 w8a8 w8a8h8 w8a8h4", FP always)
# Builds a random-init bf16 checkpoint of SHAPE, its W8A8 (RTN, per-token) and state-quantized
# variants, and runs one `mqtool bench` over all of them beside mamba-ssm's generate(cg=True).
# Writes $OUT/bench-SHAPE.{json,log}; the log has one line per measurement as it goes.
set -uo pipefail
shape=$1; batches=${2:-1,64}; variants=${3:-h4 w8a8 w8a8h8 w8a8h4}
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/bench-$shape.log"
m() { python3 -m mqtool "$@" >> "$log" 2>&1; }
d=/tmp/rt-$shape
m init "$shape" -o $d/fp --dtype bfloat16 --device cuda
has() { [[ " $variants " == *" $1 "* ]]; }
if has w8a8 || has w8a8h8 || has w8a8h4; then m quantize $d/fp --weights 8 --acts 8 --dtype bfloat16 --device cuda -o $d/w8a8; fi
if has h4; then m quantize-states $d/fp --bits 4 -o $d/h4; fi
if has w8a8h8; then m quantize-states $d/w8a8 --bits 8 -o $d/w8a8h8; fi
if has w8a8h4; then m quantize-states $d/w8a8 --bits 4 -o $d/w8a8h4; fi
ckpts=$d/fp; for v in $variants; do ckpts="$ckpts $d/$v"; done
python3 -m mqtool bench $ckpts --batch "$batches" --prompt-len 512 \
  --gen-len 128 --dtype bfloat16 --device cuda --json > "$out/bench-$shape.json" 2>> "$log"
echo "bench exit $?" >> "$log"
python3 - "$out/bench-$shape.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    print(f"{r['model'][-12:]:12s} {r['state_format']:18s} b{r['batch']:<4d} prefill {r['prefill_seconds']*1e3:8.1f} ms "
          f"decode {r['decode_ms_per_step']:7.2f} ms/step  peak {r['peak_memory_bytes']/2**30:6.2f} GiB  "
          f"state {r['state_cache_bytes']/2**30:6.3f} GiB  x{r.get('decode_speedup_vs_mamba_ssm', 1):.2f} "
          f"mem x{r.get('peak_memory_ratio_vs_mamba_ssm', 1):.2f}")
PY
