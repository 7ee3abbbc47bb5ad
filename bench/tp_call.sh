#!/usr/bin/env bash
# Issue 18's GPU run in one call: tensor parallelism on one host, every number on the same cards.
# 1. Qwen2.5-VL-7B architecture (random bf16): our server at --tensor-parallel-size 1, then 2 (W2 TPOT, W1 c=64);
# 2. Qwen2.5-VL-72B architecture, weights filled on the GPUs (--load-format dummy: no 144 GB checkpoint to write),
#    at --tensor-parallel-size 4 (TP72=2 on cards with >= 100 GB: H200), W2 TPOT against the bandwidth floor;
# 3. bench/tp_report.py's table (also in $OUT/r/tp_table.md).
# Needs 4 GPUs for step 2 (2 suffice for step 1; step 2 is skipped with fewer than TP72):
#   run(command="bash bench/tp_call.sh", kind="nvidia-h100-x4", carry=[".whl"], timeout_s=600)
# Results: $OUT/tp.tgz (saved after every step) and the reply's output tail.
set -o pipefail
source bench/device_env.sh
LIMIT_S="${LIMIT_S:-580}"
R="$OUT/r"
mkdir -p "$R"
save() { tar czf "$OUT/tp.tgz" -C "$OUT" r; }
trap save EXIT
left() { echo $((LIMIT_S - SECONDS)); }
M7=/tmp/bench-qwen2.5-vl-7b
M72=/tmp/bench-qwen2.5-vl-72b
NGPU=$(nvidia-smi -L | wc -l)
MEM_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print int($1/1024)}')
TP72="${TP72:-$([ "$MEM_GIB" -ge 100 ] && echo 2 || echo 4)}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  echo "gpus $NGPU, TP72 $TP72"; } 2>&1 | tee "$R/env.txt"
[ -f $M7/bench_meta.json ] || timeout 120 python3 -m bench.models qwen2.5-vl-7b $M7 2>&1 | tail -1 > "$R/model7b.json"
python3 -m bench.models qwen2.5-vl-72b $M72 2>&1 | tail -1 > "$R/model72b.json" &
for TP in 1 2; do
    [ "$NGPU" -lt "$TP" ] && { echo "tp$TP skipped: $NGPU GPUs"; continue; }
    BUDGET=$(( TP == 1 ? 115 : 130 ))
    [ "$BUDGET" -gt "$(( $(left) - 10 ))" ] && BUDGET=$(( $(left) - 10 ))
    SKIP=$([ "$TP" = 1 ] || echo --skip-hw)
    BENCH_OURS_ARGS="--tensor-parallel-size $TP" timeout $((BUDGET + 10)) python3 -m bench.run_all --out "$R/tp$TP" \
        --only main --preset tp --budget-s "$BUDGET" --reserve-s 5 $SKIP > "$R/tp$TP.log" 2>&1
    echo "tp$TP exit $?; $(left) s left"; save; grep -e "done," -e "failed" -e "ready after" "$R/tp$TP.log" | tail -4
done
wait
if [ "$NGPU" -ge "$TP72" ] && [ "$(left)" -gt 120 ]; then
    echo "$TP72" > "$R/tp72_size"
    BUDGET=$(( $(left) - 15 ))
    BENCH_OURS_ARGS="--tensor-parallel-size $TP72 --load-format dummy --max-model-len 8192" timeout $((BUDGET + 10)) \
        python3 -m bench.run_all --out "$R/tp72" --model qwen2.5-vl-72b --model-dir $M72 --only main --preset tp_w2 \
        --budget-s "$BUDGET" --reserve-s 5 --skip-hw > "$R/tp72.log" 2>&1
    echo "tp72 exit $?"; mkdir -p "$R/tp72"; cp "$R/tp72_size" "$R/tp72/tp_size"; save
    grep -e "done," -e "failed" -e "ready after" "$R/tp72.log" | tail -4
else
    echo "72B run skipped: $NGPU GPUs (needs $TP72) or $(left) s left"
fi
python3 -m bench.tp_report "$R" | tee "$R/tp_table.md"
