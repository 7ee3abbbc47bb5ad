"""The bundled demo model: a tiny Qwen2-VL that answers fixed questions about shapes in images (issue 3).

Import-light on purpose: the server imports this to find the weights; torch and transformers load only where a
submodule needs them.
"""

from __future__ import annotations

from pathlib import Path

#: the name the server gives the bundled model
MODEL_NAME = "vlmserve-demo"
#: the checkpoint folder (config, safetensors, tokenizer, processor and chat template files)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
