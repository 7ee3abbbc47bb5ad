#!/usr/bin/env bash
# Early GPU call of a round (issue 12): the card's ceilings, the plain-transformers baselines without HTTP
# (static-batched generate at batch 8/64, one-at-a-time generate with each piece the seed server adds), the vision
# tower against the number of images (issue 19), then the engine's profile (bench.engine_direct --quick) with a
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
timeout 120 python3 -m bench.baselines_direct $MODEL --out "$R" 2>&1 | grep -v -e "Loading weights" > "$R/baselines.log"
echo "baselines exit $?"; grep '^{' "$R/baselines.log"
timeout 90 python3 -m bench.run_all --out "$R/seed" --only seed --preset probe --budget-s 80 > "$R/seed.log" 2>&1
echo "seed exit $?"; grep -e "seed " -e "TPOT" "$R/seed.log" | tail -6
timeout 80 python3 -m bench.vision_scaling --device cuda --out "$R" --budget-s 60 --repeats 2 > "$R/vision.log" 2>&1
echo "vision exit $?"; tail -16 "$R/vision.log"
timeout 210 python3 -m bench.engine_direct --out "$R" --quick --compile-decoder 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model" > "$R/engine_direct.log"
echo "engine_direct exit $?"; grep -v '^ ' "$R/engine_direct.log" | grep -v -e '^\[' -e '^{$' -e '^}$' | tail -c 3500
