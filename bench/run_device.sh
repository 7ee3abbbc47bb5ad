#!/usr/bin/env bash
# The one GPU call: install the carried wheels, then the whole benchmark. Arguments go to bench.run_all.
#   run(command="bash bench/run_device.sh --only baselines --preset preliminary", carry=[".whl"], timeout_s=540)
set -o pipefail
source bench/device_env.sh
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, transformers, fastapi, uvicorn, pydantic; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, \
'pydantic', pydantic.__version__)"
    python3 -m bench.run_all --out "$OUT" "$@"
} 2>&1 | tee "$OUT/run.log"
