#!/usr/bin/env bash
# One GPU call that trains the demo model and evaluates it, everything it makes left under $OUT:
#   bash vlmserve/demo/gpu_run.sh INIT_DIR|- SECONDS [extra train.py flags...]
# INIT_DIR is a checkpoint to continue from (its probe, INIT_DIR.probe.pt, is picked up too); "-" starts from the
# untrained model of build.py. $OUT receives card.txt, train.log, eval.txt, w.tar (the checkpoint,
# rewritten after every save, so a call cut short still returns the last one) and w.probe.pt (its vision probe).
# DEVICE (default cuda) and EVAL_SAMPLES (default 2000) exist for a smoke test on the CPU.
set -o pipefail
INIT="$1"
BUDGET="$2"
shift 2
OUT="${OUT:-/tmp/demo-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
nproc | tee -a "$OUT/card.txt"
init_flag=()
[ "$INIT" != "-" ] && init_flag=(--init "$INIT")
python3 -m vlmserve.demo.train --out /tmp/w "${init_flag[@]}" --steps 1000000 --time-budget "$BUDGET" \
    --batch-size 256 --group-size 4 --save-every 60 --archive "$OUT/w.tar" --log-every 50 --device "${DEVICE:-cuda}" "$@" 2>&1 \
    | grep --line-buffered -v -e "Writing model shards" -e "Loading weights" | tee "$OUT/train.log"
python3 -m vlmserve.demo.evaluate /tmp/w --num-samples "${EVAL_SAMPLES:-2000}" --seed 1 --device "${DEVICE:-cuda}" 2>&1 \
    | grep -v -e "Loading weights" | tee "$OUT/eval.txt"
cp /tmp/w.probe.pt "$OUT/w.probe.pt"
