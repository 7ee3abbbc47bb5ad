#!/usr/bin/env bash
# The one GPU call: install the carried wheels, then the whole benchmark. Arguments go to bench.run_all.
#   run(command="bash bench/run_device.sh --only baselines --preset preliminary", carry=[".whl"], timeout_s=540)
set -o pipefail
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, transformers, fastapi, uvicorn, pydantic, openai; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, \
'pydantic', pydantic.__version__, 'openai', openai.__version__)"
    python3 -m bench.run_all --out "$OUT" "$@"
} 2>&1 | tee "$OUT/run.log"
