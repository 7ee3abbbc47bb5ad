#!/usr/bin/env bash
# Issue 14's MoE and Qwen3-VL measurement in one GPU call (bench/moe.py says what is measured and how):
# (a) Qwen3-VL-30B-A3B-shaped MoE (8 of 48 decoder layers, random bf16): one expert layer and W1-like c=1 / c=64
#     through the paged engine, transformers' expert loop vs transformers' grouped_mm vs vlmserve's grouped GEMM;
# (b) Qwen3-VL-8B architecture (random bf16): W1 c=64, generate engine vs paged engine.
# Results: $OUT/moe.json, $OUT/moe.md, $OUT/moe.log; every number names the card.
#   run(command="LIMIT_S=530 bash bench/moe_call.sh", carry=[".whl"], timeout_s=540)
# CPU smoke of the whole script (tiny layers): BENCH_MOE_TINY=1 OUT=/tmp/moe-smoke bash bench/moe_call.sh
set -o pipefail
LIMIT_S="${LIMIT_S:-530}"
if [ "${BENCH_MOE_TINY:-0}" = 1 ]; then
    OUT="${OUT:-/tmp/moe-smoke}"; mkdir -p "$OUT"; PY=python
    export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
else
    source bench/device_env.sh; PY=python3   # llguidance (the engines' structured outputs) comes from .whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/env.txt"
# the python part stops starting new parts 25 s before the limit; timeout is the backstop
timeout $((LIMIT_S - 5)) $PY -m bench.moe --out "$OUT" --budget-s $((LIMIT_S - 30)) 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model shards" > "$OUT/moe.log"
rc=$?
grep -e '^{' -e 'Error' "$OUT/moe.log" | tail -20
cat "$OUT/moe.md" 2>/dev/null
echo "bench.moe exit $rc after $SECONDS s"
