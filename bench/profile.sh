#!/usr/bin/env bash
# One GPU call that shows where the engine's time goes: bench.engine_direct in full (tiny CUDA correctness check,
# then the 7-B model driven without HTTP: decode step times, closed-loop W1 at c=64 plain and with per-piece
# timers, a torch.profiler table, and whether the GIL is free while the engine waits for the GPU), then our
# server alone through HTTP (W1/W2/W3, preset onecall) to compare.
#   run(command="bash bench/profile.sh", carry=[".whl"], timeout_s=590)
set -o pipefail
source bench/device_env.sh
timeout 300 python3 -m bench.engine_direct --out "$OUT" 2>&1 | grep -v -e "Loading weights" -e "Writing model" \
    > "$OUT/engine_direct.log"
echo "engine_direct exit $?"
grep -v '^ ' "$OUT/engine_direct.log" | tail -c 3000
bash bench/run_device.sh --only ours --preset onecall --budget-s 230
