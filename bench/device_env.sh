# Sourced by the one-call GPU scripts: makes $OUT, installs the carried wheels (.whl: the web stack the device
# lacks) into /tmp/site, and sets the import path and offline mode.
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
