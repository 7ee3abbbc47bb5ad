"""Every tiny family loads like a downloaded checkpoint and runs image + text generation end to end.

Per family (tests/fixtures/tiny/registry.py): build into a temp dir, load with `AutoModelForImageTextToText` and
`vlmserve.models.hf_processor.load_processor`, render a chat through the processor's template, run the processor
on text + PIL images, check the placeholder tokens against the vision features, and generate 4 tokens greedily.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.fixtures.tiny.registry import FAMILIES, TinyFamily
from vlmserve.models import hf_compat
from vlmserve.models.families import own_head

pytestmark = [
    # torch's Tensor.__array__/__array_wrap__ predate numpy 2's keywords; transformers' processors call np.array
    # and np.cumsum on tensors (GLM-4V's mm_token_type_ids, InternVL's patch counts). Third-party, harmless here.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    # transformers' own Mllama vision encoder still calls its layers with a keyword it deprecated.
    pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning"),
]

_MODELS: dict[str, tuple[Any, Path]] = {}
_PROCESSORS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_families")


def _load_model(family: TinyFamily, root: Path) -> tuple[Any, Path]:
    """(model, checkpoint dir), built and loaded once per session."""
    if family.name not in _MODELS:
        from transformers import AutoModelForImageTextToText

        path = family.build(root / family.name)
        _MODELS[family.name] = (AutoModelForImageTextToText.from_pretrained(path).eval(), path)
    return _MODELS[family.name]


def _load_processor(family: TinyFamily, path: Path) -> Any:
    """The processor through vlmserve's loader; skipped only where transformers 5.17 needs torchvision for it."""
    if family.name in _PROCESSORS:
        return _PROCESSORS[family.name]
    from vlmserve.models.hf_processor import load_processor

    missing = family.missing()
    if missing:
        pytest.skip(missing)
    processor = load_processor(path)
    _check_processor_kwargs(processor, path)
    _PROCESSORS[family.name] = processor
    return processor


def _check_processor_kwargs(processor: Any, path: Path) -> None:
    """The processor must carry the checkpoint's processor_config.json values (e.g. image tokens per tile)."""
    config_file = path / "processor_config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    # Only values the processor keeps as attributes can be compared (some are consumed in __init__).
    wrong = {key: (value, getattr(processor, key)) for key, value in saved.items()
             if hasattr(processor, key) and getattr(processor, key) != value}
    assert not wrong, f"processor lost processor_config.json values (saved, loaded): {wrong}"


def _images(count: int) -> list[Image.Image]:
    """Deterministic images of different sizes and aspect ratios."""
    sizes = [(64, 48), (40, 60)]
    generator = torch.Generator().manual_seed(count)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
            for w, h in sizes[:count]]


def _image_token_id(config: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise AssertionError(f"{type(config).__name__} names no image token id")


def _feature_rows(model: Any, inputs: dict[str, Any]) -> tuple[int, int]:
    """(rows, width) of the features the model merges at the image tokens, via its own get_image_features."""
    output = _image_features(model, inputs)
    if model.config.model_type == "granite4_vision":  # features only per decoder layer they are added before
        layers = list(hf_compat.features_by_layer(output).values())
        return layers[0].shape[0], layers[0].shape[-1]
    pooled = getattr(output, "pooler_output", None)
    pooled = output if pooled is None else pooled
    pieces = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
    rows = sum(piece.reshape(-1, piece.shape[-1]).shape[0] for piece in pieces)
    return rows, pieces[0].shape[-1]


def _image_features(model: Any, inputs: dict[str, Any]) -> Any:
    """The model's own get_image_features output for the processor's inputs."""
    # The inner model always has it; some outer classes (DeepSeek-VL, Janus) do not re-export it.
    get_image_features = model.model.get_image_features
    accepted = inspect.signature(get_image_features).parameters
    with torch.no_grad():
        return get_image_features(**{k: v for k, v in inputs.items() if k in accepted})


def _recipe_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Logits by the generic paged recipe: text embeddings with the vision features scattered at the image tokens,
    explicit positions (get_rope_index where the model has it), the decoder alone with its own causal mask
    (plus Qwen3-VL's deepstack inputs and Ovis2's visual indicator embeddings), then lm_head."""
    inner, input_ids = model.model, inputs["input_ids"]
    decoder = getattr(inner, "language_model", None) or inner.text_model
    output = _image_features(model, inputs)
    is_image = input_ids == _image_token_id(model.config)
    if model.config.model_type == "granite4_vision":
        return _granite_recipe_logits(model, inputs, output, is_image)
    pooled = getattr(output, "pooler_output", None)
    pieces = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
    features = torch.cat([piece.reshape(-1, piece.shape[-1]) for piece in pieces])
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(input_ids)
        embeds = embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))
        indicators = getattr(output, "visual_indicator_features", None)  # Ovis2
        for index, token_id in enumerate(getattr(inner, "visual_indicator_token_ids", None) or ()):
            embeds[input_ids == token_id] = indicators[index].to(embeds.dtype)
        if hasattr(inner, "get_rope_index"):
            positions = hf_compat.rope_index(inner, dict(inputs))[0][:, None, :]
        else:
            positions = torch.arange(input_ids.shape[1])[None]
        extras: dict[str, Any] = {}
        deepstack = hf_compat.deepstack_features(output)
        if deepstack is not None:
            extras = {"visual_pos_masks": is_image, "deepstack_visual_embeds": deepstack}
        hidden = decoder(inputs_embeds=embeds, position_ids=positions, **extras).last_hidden_state
        scale = hf_compat.logit_scale(model)
        return model.lm_head(hidden) * (scale if scale is not None else 1.0)


def _granite_recipe_logits(model: Any, inputs: dict[str, Any], output: Any, is_image: torch.Tensor) -> torch.Tensor:
    """Granite 4 Vision's recipe: image tokens' embeddings zeroed, each layer's features added before that decoder
    layer (the paged spec's layer_features), then the model's own head (it divides by logits_scaling)."""
    by_layer = hf_compat.features_by_layer(output)
    layers = hf_compat.injection_layers(model.config)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"]).masked_fill(is_image[..., None], 0.0)
        extras = hf_compat.layer_feature_kwargs(layers, is_image, [by_layer[layer] for layer in layers])
        positions = torch.arange(embeds.shape[1])[None]
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=positions, **extras).last_hidden_state
        return own_head(model)(hidden[0])[None]


def _runs(mask: torch.Tensor) -> int:
    """Number of maximal runs of True in a 1-D mask."""
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
    return int(starts.sum())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_checkpoint_loads_like_a_download(name: str, tiny_root: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    family = FAMILIES[name]
    model, path = _load_model(family, tiny_root)
    for file in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert (path / file).is_file(), file
    assert any((path / file).is_file() for file in ("chat_template.jinja", "chat_template.json"))
    assert AutoConfig.from_pretrained(path).model_type == family.name
    assert type(model).__name__ == family.model_class
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    # Random weights pick any id: every token must decode to ASCII so streamed text stays whole UTF-8. Added tokens
    # keep their published names (DeepSeek's use full-width bars); each decodes whole on its own.
    added = set(tokenizer.get_added_vocab().values())
    undecodable = [i for i in range(len(tokenizer)) if i not in added and not tokenizer.decode([i]).isascii()]
    assert not undecodable


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_processor_loads_with_its_chat_template(name: str, tiny_root: Path) -> None:
    family = FAMILIES[name]
    _, path = _load_model(family, tiny_root)
    processor = _load_processor(family, path)
    assert processor.chat_template, "no chat template reached the processor"
    assert type(processor).__name__.endswith("Processor")


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_image_chat_generates(name: str, num_images: int, tiny_root: Path) -> None:
    family = FAMILIES[name]
    if num_images > 1 and not family.is_multi_image:
        pytest.skip(f"{name} takes one image per prompt")
    model, path = _load_model(family, tiny_root)
    processor = _load_processor(family, path)
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": "What is in this picture?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    assert isinstance(text, str) and "What is in this picture?" in text
    inputs = processor(text=[text], images=_images(num_images), return_tensors="pt")
    input_ids = inputs["input_ids"]
    is_image = input_ids[0] == _image_token_id(model.config)
    if family.merges_at_placeholders:
        rows, width = _feature_rows(model, dict(inputs))
        assert int(is_image.sum()) == rows > 0
        assert width == model.config.get_text_config().hidden_size
        if family.is_contiguous_per_image:
            # One run per image, except where the template puts two images' placeholders side by side.
            assert 1 <= _runs(is_image) <= num_images
        else:
            # Tiles or rows split an image's placeholders; a one-tile image may still be a single run.
            assert _runs(is_image) >= num_images
    else:
        assert int(is_image.sum()) == num_images

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (1, input_ids.shape[1] + 4)
    assert torch.equal(output[0, : input_ids.shape[1]], input_ids[0])
    assert processor.decode(output[0, input_ids.shape[1]:]).isascii()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generic_recipe_reproduces_forward(name: str, tiny_root: Path) -> None:
    """What the paged engine will run, checked against the model's own forward on a two-image prompt."""
    family = FAMILIES[name]
    if family.paged_blocker:
        pytest.skip(f"{name} is served by the generate fallback: {family.paged_blocker}")
    if not family.merges_at_placeholders:
        pytest.skip(f"{name}'s vision states reach the decoder by cross-attention (models/cross_attention.py, checked "
                    "against generate in tests/integration/models/test_paged_logprobs.py), not at its placeholders")
    model, path = _load_model(family, tiny_root)
    processor = _load_processor(family, path)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is in this picture?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = dict(processor(text=[text], images=_images(2), return_tensors="pt"))
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels
    with torch.no_grad():
        expected = model(**inputs).logits
    error = float((_recipe_logits(model, inputs) - expected).abs().max())
    if family.recipe_extras:
        # The extras are real: without them the recipe computes something else.
        assert error > 1e-3, f"{name}: recipe matched without {family.recipe_extras}"
    else:
        assert error < 1e-4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_build_is_deterministic(name: str, tiny_root: Path, tmp_path: Path) -> None:
    family = FAMILIES[name]
    _, path = _load_model(family, tiny_root)
    again = family.build(tmp_path / name)
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / file).read_bytes() == (path / file).read_bytes(), file
