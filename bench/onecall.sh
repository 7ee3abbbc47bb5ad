#!/usr/bin/env bash
# The whole measurement in one GPU call: the paged engine's CUDA correctness check on a tiny model, then
# run_all with ours (prefix cache on and off), transformers serve and the seed server (preset "onecall").
#   run(command="bash bench/onecall.sh", carry=[".whl"], timeout_s=595)
set -o pipefail
source bench/device_env.sh
timeout 100 python3 -m bench.engine_direct --out "$OUT" --skip-7b > "$OUT/engine_direct.log" 2>&1
echo "engine_direct exit $?"
tail -c 400 "$OUT/engine_direct.log"
bash bench/run_device.sh --only ours,ours-nocache,tserve,seed --preset onecall --budget-s 490
