"""Native Qwen-VL-Chat (Qwen/Qwen-VL-Chat): loads the published checkpoint directory unchanged, no remote code.

- `config`: the checkpoint's config.json keys;
- `visual`: the ViT-bigG-style tower and the 256-query resampler;
- `modeling`: the Qwen-7B decoder and the whole model (`QwenVLChatForCausalLM`), parameter names as published;
- `checkpoint`: strict loading of the sharded weights;
- `tokenizer` / `processor`: qwen.tiktoken via `tokenizers`, the ChatML prompt format, image preprocessing;
- `adapter`: `matches(config)`, `load(...)` and the `ModelAdapter` both engines drive.
"""
