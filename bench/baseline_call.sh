#!/usr/bin/env bash
# Early GPU call of a round (issue 12): the card's ceilings, the plain-transformers baselines without HTTP
# (one-at-a-time generate with each piece the seed server adds, and the seed server itself through HTTP), then
# the engine's profile (bench.engine_direct --quick) with a
# compiled-decoder trial. Everything lands in $OUT/call.tgz (results) and the reply's output tail.
#   run(command="cd .scratch/perf && bash bench/baseline_call.sh", carry=[".scratch/perf"], timeout_s=540)
set -o pipefail
source bench/device_env.sh
R="$OUT/r"
mkdir -p "$R"
trap 'tar czf "$OUT/call.tgz" -C "$OUT" r' EXIT
MODEL=/tmp/bench-qwen2.5-vl-7b
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$R/env.txt"
timeout 60 python3 -m bench.hw > "$R/hw.json" 2>&1; tail -1 "$R/hw.json"
[ -f $MODEL/bench_meta.json ] || timeout 150 python3 -m bench.models qwen2.5-vl-7b $MODEL 2>&1 | tail -1 > "$R/model.json"
timeout 100 python3 -m bench.baselines_direct $MODEL --out "$R" --batches "" 2>&1 | grep -v -e "Loading weights" > "$R/baselines.log"
echo "baselines exit $?"; grep '^{' "$R/baselines.log"
timeout 90 python3 -m bench.run_all --out "$R/seed" --only seed --preset probe --budget-s 80 > "$R/seed.log" 2>&1
echo "seed exit $?"; grep -e "seed " "$R/seed.log" | tail -4
python3 -c "import json; r = json.load(open('$R/seed/results.json'))['servers']['seed'].get('runs', {})
for k, v in r.items(): print('seed http', k, 'TTFT p50', round(v.get('ttft_ms', {}).get('p50', -1)), 'TPOT p50', round(v.get('tpot_ms', {}).get('p50', -1), 1))" 2>&1 | tail -4
timeout 210 python3 -m bench.engine_direct --out "$R" --quick --compile-decoder 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model" > "$R/engine_direct.log"
echo "engine_direct exit $?"; grep -v '^ ' "$R/engine_direct.log" | grep -v -e '^\[' -e '^{$' -e '^}$' | tail -c 3500
