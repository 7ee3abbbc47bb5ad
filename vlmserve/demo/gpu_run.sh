#!/usr/bin/env bash
# One GPU call that trains the demo model for a time limit, evaluates it and leaves everything under $OUT:
#   OUT=... [TRAIN_SECONDS=470] [RESUME=path/w.tar] [SEED=..] bash vlmserve/demo/gpu_run.sh [extra train.py flags...]
# Without RESUME it starts a new model (build.py: the wider language model and the retrained tokenizer) whose vision
# tower and merger come from INIT_VISION (default: the shipped weights, vlmserve/demo/weights). With RESUME (the
# w.tar an earlier call left under its $OUT, carried back in) it continues from that checkpoint and its vision
# probe at a lower learning rate (RESUME_LR, default 4e-4), as issue 3's stages G2/G3 did.
# NOTE: the optimiser's state is not kept across calls; a resumed run starts AdamW afresh with a short warm-up.
# $OUT receives: card.txt, train.log, w.tar (checkpoint + probe, rewritten every SAVE_EVERY s, so a call cut short
# still returns the last one), eval.txt (the per-type table) and weights/ (the files vlmserve/demo/weights holds).
# Needs only torch + transformers (+ safetensors, tokenizers, jinja2, Pillow): nothing from vlmserve.api, so no
# FastAPI/pydantic and no carried wheels. DEVICE (default cuda), EVAL_SAMPLES (2000), EVAL_TOOL (300 per tool/JSON
# row), EVAL_EXTRA (200 later-turn and no-image), BATCH (256) and WORKERS exist for a smoke test on the CPU.
set -o pipefail
OUT="${OUT:-/tmp/demo-out}"
TRAIN_SECONDS="${TRAIN_SECONDS:-470}"
DEVICE="${DEVICE:-cuda}"
W=/tmp/demo-w
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; nproc; } \
    | tee "$OUT/card.txt"
rm -rf "$W" "$W.probe.pt"
if [ -n "${RESUME:-}" ]; then
    R=/tmp/demo-resume
    rm -rf "$R" "$R.probe.pt" && mkdir -p "$R" && tar -xf "$RESUME" -C "$R" || { echo "cannot read $RESUME"; exit 1; }
    [ -f "$R/vision_probe.pt" ] && mv "$R/vision_probe.pt" "$R.probe.pt"
    start=(--init "$R" --seed "${SEED:-11}" --lr "${RESUME_LR:-4e-4}" --warmup-steps 20 --min-lr-ratio 0.05)
else
    start=(--init-vision "${INIT_VISION-vlmserve/demo/weights}" --seed "${SEED:-10}" --lr 1.5e-3 --warmup-steps 100
           --min-lr-ratio 0.03)
fi
workers=()
[ -n "${WORKERS:-}" ] && workers=(--workers "$WORKERS")
python3 -m vlmserve.demo.train --out "$W" "${start[@]}" --steps 1000000 --time-budget "$TRAIN_SECONDS" \
    --batch-size "${BATCH:-256}" --group-size 4 --vision-lr-scale 0.3 --save-every "${SAVE_EVERY:-60}" \
    --archive "$OUT/w.tar" --log-every 50 --device "$DEVICE" "${workers[@]}" "$@" 2>&1 \
    | grep --line-buffered -v -e "Writing model shards" -e "Loading weights" | tee "$OUT/train.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "training failed"; exit 1; }
mkdir -p "$OUT/weights"
cp "$W"/*.json "$W"/*.jinja "$W"/model.safetensors "$OUT/weights/"
python3 -m vlmserve.demo.evaluate "$W" --num-samples "${EVAL_SAMPLES:-2000}" --num-tool "${EVAL_TOOL:-300}" --num-extra "${EVAL_EXTRA:-200}" \
    --seed "${EVAL_SEED:-1}" --batch-size 250 --device "$DEVICE" 2>&1 | grep -v -e "Loading weights" | tee "$OUT/eval.txt"
ls -l "$OUT" "$OUT/weights"
