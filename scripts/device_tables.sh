#!/usr/bin/env bash
# Runs the accuracy tables for one reference model on the GPU machine (device tool). Usage:
#   scripts/device_tables.sh MODEL_DIR NAME PART     (PART: fp | linear | states | kernels | timing)
# Writes NAME-PART.{md,json,log} under $OUT (or ./out). `kernels` runs the kernel and runtime tests
# compiled (one log per file, so a cut-off run still says which failed; MODEL_DIR is ignored);
# `timing` times the w4a8-klt recipe on a mamba2-2.7b-shaped random model (NAME = compute dtype).
# Run one part at a time on the GPU: parallel table processes ran out of GPU memory beside a 2.7b job.
set -uo pipefail
model=$1; name=$2; part=$3
out=${OUT:-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MQTOOL_DATA=${MQTOOL_DATA:-$PWD/.carry/data}
tasks=wikitext2,c4,techdocs-test
case $part in
fp)
  for mode in parallel recurrent; do
    python3 -m mqtool eval "$model" --tasks $tasks --seqlen 1024 --mode $mode --batch-size 512 --json \
      > "$out/$name-fp-$mode.json" 2> "$out/$name-fp-$mode.log"
    python3 - "$out/$name-fp-$mode.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for t, r in d["results"].items():
    print(f"{r['mode']:9s} {t:14s} ppl {r['ppl']:.3f}  windows {r['windows']}  {r['seconds']:.1f}s")
PY
  done ;;
linear)
  python3 -u -m mqtool compare "$model" --tasks $tasks --seqlen 1024 --batch-size 64 \
    --recipes w8a8-rtn,w8a8-gptq,w8a8-smoothquant,w8a8-quarot,w8a8-klt,w4a8-rtn,w4a8-gptq,w4a8-smoothquant,w4a8-quarot,w4a8-ablation-klt,w4a8-ablation-hadamard-sf,w4a8-ablation-klt-sf,w4a8-klt \
    --markdown "$out/$name-linear.md" --json-out "$out/$name-linear.json" > "$out/$name-linear.log" 2>&1 ;;
states)
  python3 -u -m mqtool compare "$model" --tasks $tasks --seqlen 1024 --batch-size 512 --samples ${ESR_SAMPLES:-32} \
    --recipes w16a16h8-dsq,w16a16h8-perchannel,w16a16h6-dsq,w16a16h6-perchannel,w16a16h4-pertensor,w16a16h4-perchannel,w16a16h4-perstate,w16a16h4-dsq,w16a16h4-dsq-esr,w8a8h8-qmamba,w8a8h6-qmamba,w8a8h4-qmamba,w4a8h4-klt-dsq \
    --markdown "$out/$name-states.md" --json-out "$out/$name-states.json" > "$out/$name-states.log" 2>&1 ;;
kernels)
  for f in tests/test_kernels_act_quant.py tests/test_kernels_matmul.py tests/test_kernels_state_update.py \
           tests/test_runtime.py; do
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short "$f" > "$out/$(basename "$f" .py).log" 2>&1
  done ;;
timing)
  python3 -m mqtool init mamba2-2.7b -o /tmp/r27 --device cuda > "$out/timing-$name.log" 2>&1
  start=$(date +%s)
  python3 -u -m mqtool quantize /tmp/r27 --recipe w4a8-klt --dtype "$name" -o /tmp/q27 --force >> "$out/timing-$name.log" 2>&1
  rc=$?
  echo "w4a8-klt on mamba2-2.7b ($name): $(( $(date +%s) - start )) s, exit $rc" >> "$out/timing-$name.log" ;;
esac
