#!/usr/bin/env bash
# The round's whole measurement in one GPU call (issues 12, 10 and 19), every number on one card. First, always: the
# paged engine's CUDA correctness check (tiny Qwen2-VL fp32: paged == generate, token for token, with decode +
# vision-tower graphs, mixed steps, eager chunks, and the compiled decoder) while the 7B checkpoint is built. Then the
# steps in the order STEPS gives (default below); a step is skipped when less than its time is left of LIMIT_S:
#   structured  structured outputs' cost: W1 c=64 through the core with a JSON schema on every request vs without
#   vision      the vision tower's time and peak memory against the number of images (segmented vs dense mask)
#   overhead    what the HTTP server adds over the engine alone, demo model on the device's CPU
#   baselines   plain transformers without HTTP: one-at-a-time generate with each piece the seed server adds,
#               static-batched generate at batch 8 and 64
#   serve       vlmserve through HTTP with the prefix cache on (COMPILE=1: --compile-decoder if its check passed)
#               and off
#   seed        the seed-style server through HTTP (preset probe)
# Results: $OUT/call.tgz (saved after every step), plus the reply's output tail.
#   run(command="LIMIT_S=550 bash bench/final_call.sh", carry=[".whl"], timeout_s=600)
set -o pipefail
source bench/device_env.sh
LIMIT_S="${LIMIT_S:-470}"
R="$OUT/r"
mkdir -p "$R"
save() { tar czf "$OUT/call.tgz" -C "$OUT" r; }
trap save EXIT
left() { echo $((LIMIT_S - SECONDS)); }
MODEL=/tmp/bench-qwen2.5-vl-7b
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers, fastapi; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fastapi', fastapi.__version__)"
} 2>&1 | tee "$R/env.txt"
(timeout 75 python3 -m bench.engine_direct --out "$R" --skip-7b > "$R/check.log" 2>&1; echo "check exit $?") &
[ -f $MODEL/bench_meta.json ] || timeout 90 python3 -m bench.models qwen2.5-vl-7b $MODEL 2>&1 | tail -1 > "$R/model.json"
wait
save; grep -A5 tiny_fp32 "$R/check.log" | head -7
matches() { python3 -c "import json; print(json.load(open('$R/engine_direct.json'))['tiny_fp32_cuda_matches_of_8'].get('$1'))" 2>/dev/null; }
# vision graphs serve once their CUDA check passed; COMPILE=1 adds --compile-decoder (~45 s more start-up) likewise
[ "$(matches graphs-vision-graphs)" = "8" ] && export BENCH_OURS_ARGS="--enable-vision-graphs"
[ "$(matches graphs-compiled)" = "8" ] && [ "${COMPILE:-0}" = 1 ] && export BENCH_OURS_ARGS="${BENCH_OURS_ARGS:-} --compile-decoder"
echo "ours extra args: ${BENCH_OURS_ARGS:-none}; $(left) s left"
# The steps, each skipped when less than its time is left; STEPS picks and orders them (default: the cheap ones
# that other issues wait on first, then the long HTTP runs).
step_structured() {  # issue 10: grammar cost at c=64
    [ "$(left)" -gt 90 ] || return 0
    timeout $(( $(left) - 25 < 130 ? $(left) - 25 : 130 )) python3 -m bench.structured_overhead --out "$R/structured" \
        --requests 128 > "$R/structured.log" 2>&1
    echo "structured exit $?"; tail -4 "$R/structured.log"
}
step_vision() {  # issue 19: tower time and memory against the number of images
    [ "$(left)" -gt 20 ] || return 0
    timeout 30 python3 -m bench.vision_scaling --device cuda --out "$R" --budget-s $(( $(left) < 25 ? $(left) - 5 : 20 )) \
        --repeats 2 --counts 1,4,16 > "$R/vision.log" 2>&1
    echo "vision exit $?"; grep '^|' "$R/vision.log" | tail -7
}
step_overhead() {  # a CPU measurement: the device's idle cores are calmer than the shared CPU box
    [ "$(left)" -gt 50 ] || return 0
    CUDA_VISIBLE_DEVICES= timeout 45 python3 -m bench.server_overhead --requests 100 > "$R/server_overhead.log" 2>&1
    echo "server overhead exit $?"; tail -1 "$R/server_overhead.log"
}
step_baselines() {
    [ "$(left)" -gt 40 ] || return 0
    timeout ${BASELINES_S:-75} python3 -m bench.baselines_direct $MODEL --out "$R" --requests 1 \
        --variants "${VARIANTS-plain,stop_criterion,streamer_thread,seed_structure}" 2>&1 \
        | grep -v -e "Loading weights" > "$R/baselines.log"
    echo "baselines exit $?"; grep '^{' "$R/baselines.log"
}
step_serve() {
    local budget="${SERVE_BUDGET:-190}"
    [ "$budget" -gt "$(( $(left) - 5 ))" ] && budget=$(( $(left) - 5 ))
    [ "$budget" -gt 30 ] || return 0
    timeout $((budget + 5)) python3 -m bench.run_all --out "$R/serve" --only "${SERVE_SERVERS:-ours-nocache,ours}" \
        --preset final --budget-s "$budget" --reserve-s 5 > "$R/serve.log" 2>&1
    echo "serve exit $?"; grep -e "done," -e "failed" -e "ready after" "$R/serve.log" | tail -9
}
step_seed() {
    [ "$(left)" -gt 65 ] || return 0
    timeout 65 python3 -m bench.run_all --out "$R/seed" --only seed --preset probe --budget-s 62 --reserve-s 3 \
        --skip-hw > "$R/seed.log" 2>&1
    echo "seed exit $?"; grep -e "done," -e "failed" "$R/seed.log" | tail -3
}
for step in ${STEPS:-structured vision overhead baselines serve seed}; do
    "step_$step"; save
done
echo "done at $SECONDS s"
