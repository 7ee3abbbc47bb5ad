#!/usr/bin/env bash
# Ask vlmserve about an image with curl. Start the server first: vlmserve serve
# Usage: examples/curl.sh [IMAGE_FILE] [QUESTION]
set -euo pipefail
image="${1:-}"
question="${2:-Describe the image.}"
if [ -z "$image" ]; then
    image=vlmserve-sample.png
    python -c "from vlmserve.demo.shapes import draw_sample_image; draw_sample_image(7).save('$image')"
fi
payload=$(python - "$image" "$question" <<'PY'
import base64, json, sys
path, question = sys.argv[1], sys.argv[2]
mime = "image/jpeg" if path.lower().endswith((".jpg", ".jpeg")) else "image/png"
url = f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()
print(json.dumps({"model": "vlmserve-demo", "max_tokens": 64, "temperature": 0, "messages": [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                 {"type": "text", "text": question}]}]}))
PY
)
curl -s http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
    ${VLMSERVE_API_KEY:+-H "Authorization: Bearer $VLMSERVE_API_KEY"} -d "$payload"
echo
