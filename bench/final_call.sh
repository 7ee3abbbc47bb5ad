#!/usr/bin/env bash
# The round's whole measurement in one GPU call (issue 12 and issue 19's tower item), every number on one card:
# 1. the paged engine's CUDA correctness check (tiny Qwen2-VL fp32: paged == generate, token for token);
# 2. the vision tower's time and peak memory against the number of images (segmented vs the old dense mask);
# 3. the plain-transformers baselines without HTTP: static-batched generate at batch 8 and 64, one-at-a-time;
# 4. run_all: vlmserve (prefix cache on and off) and the seed-style server through HTTP (preset onecall);
# 5. if the sampling tree's bench/structured_overhead.py was copied to .scratch/sampling, its measurement.
# Results: $OUT/call.tgz, plus the reply's output tail.
#   run(command="cd .scratch/perf && bash bench/final_call.sh", carry=[".scratch"], timeout_s=595)
set -o pipefail
source bench/device_env.sh
R="$OUT/r"
mkdir -p "$R"
trap 'tar czf "$OUT/call.tgz" -C "$OUT" r' EXIT
MODEL=/tmp/bench-qwen2.5-vl-7b
SERVERS="${SERVERS:-ours,ours-nocache,seed}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$R/env.txt"
timeout 80 python3 -m bench.engine_direct --out "$R" --skip-7b > "$R/check.log" 2>&1
echo "check exit $?"; grep -A4 tiny_fp32 "$R/check.log" | head -6
timeout 75 python3 -m bench.vision_scaling --device cuda --out "$R" --budget-s 60 --repeats 2 --counts 1,4,16 \
    > "$R/vision.log" 2>&1
echo "vision exit $?"; tail -9 "$R/vision.log"
[ -f $MODEL/bench_meta.json ] || timeout 150 python3 -m bench.models qwen2.5-vl-7b $MODEL 2>&1 | tail -1 > "$R/model.json"
timeout 110 python3 -m bench.baselines_direct $MODEL --out "$R" --variants plain 2>&1 \
    | grep -v -e "Loading weights" > "$R/baselines.log"
echo "baselines exit $?"; grep '^{' "$R/baselines.log"
timeout 330 python3 -m bench.run_all --out "$R/serve" --only "$SERVERS" --preset onecall --budget-s 320 \
    > "$R/serve.log" 2>&1
echo "run_all exit $?"; grep -e "done," -e "failed" "$R/serve.log" | tail -14
if [ -f ../sampling/bench/structured_overhead.py ]; then
    (cd ../sampling && PYTHONPATH=/tmp/site:. timeout 100 python3 -m bench.structured_overhead --out "$R/structured") \
        > "$R/structured.log" 2>&1
    echo "structured exit $?"; tail -6 "$R/structured.log"
fi
