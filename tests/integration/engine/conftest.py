"""Drive engine cores directly (no HTTP): tiny models, rendered prompts, a synchronous step loop."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.decode import image_hash
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import ChatMessage, GenerationRequest, ImagePart, PreparedPrompt, SamplingParams, TextPart

#: the four families issue 4 names: two M-RoPE Qwens, GLM-4.1V (M-RoPE, its own vision tower), LLaVA (1-D RoPE)
ENGINE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "glm4v", "llava")


@dataclasses.dataclass
class Loaded:
    """Two independent copies of one tiny checkpoint: one for the engine, one as the reference."""

    path: Path
    adapter: ModelAdapter
    reference: ModelAdapter
    renderer: PromptRenderer

    def fresh_adapter(self) -> ModelAdapter:
        return load_model(ModelConfig(model=str(self.path)))

    @functools.cached_property
    def generate_adapter(self) -> ModelAdapter:
        """A copy no paged core ever touches (a paged core installs its attention into the model it is given, and
        `adapter` is shared by the paged tests), for the generate core's tests in any order."""
        return self.fresh_adapter()


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.fixtures.tiny.registry import FAMILIES

    root = tmp_path_factory.mktemp("engine-families")
    return {name: FAMILIES[name].build(root / name) for name in ENGINE_FAMILIES}


@pytest.fixture(scope="session")
def loaded(family_checkpoints: dict[str, Path]) -> Callable[[str], Loaded]:
    cache: dict[str, Loaded] = {}

    def get(family: str) -> Loaded:
        if family not in cache:
            path = family_checkpoints[family]
            adapter = load_model(ModelConfig(model=str(path)))
            renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                                      max_model_len=adapter.max_model_len)
            cache[family] = Loaded(path, adapter, load_model(ModelConfig(model=str(path))), renderer)
        return cache[family]

    return get


def image(index: int, size: tuple[int, int] | None = None) -> Image.Image:
    color = ((index * 67) % 256, (index * 151) % 256, (index * 29 + 80) % 256)
    picture = Image.new("RGB", size or (56 + 14 * (index % 4), 84 - 7 * (index % 3)), color)
    for x in range(0, picture.width, 7):  # some texture, so images differ beyond their mean colour
        picture.putpixel((x, (x * index) % picture.height), (255 - color[0], color[1], 255 - color[2]))
    return picture


def user_turn(text: str, *images: Image.Image) -> ChatMessage:
    parts: list[TextPart | ImagePart] = [ImagePart(img, image_hash(img)) for img in images]
    return ChatMessage("user", (*parts, TextPart(text)))


def prompts_with_images(renderer: PromptRenderer, count: int) -> list[PreparedPrompt]:
    """`count` prompts with different images and different text lengths."""
    return [renderer.render([user_turn("Describe this picture" + " please" * i + ".", image(i))])
            for i in range(count)]


def request(request_id: str, prompt: PreparedPrompt, **sampling: object) -> GenerationRequest:
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **sampling}
    return GenerationRequest(request_id=request_id, prompt=prompt, sampling=SamplingParams(**params))  # type: ignore[arg-type]


def run_core(core: object, requests: list[GenerationRequest], *, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step `core` until idle; returns each request's generated tokens."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished.add(output.request_id)

    for r in requests:
        core.add_request(r)  # type: ignore[attr-defined]
    for _ in range(max_steps):
        if not core.has_work():  # type: ignore[attr-defined]
            break
        core.step(emit)  # type: ignore[attr-defined]
    assert finished == set(tokens), "not every request finished"
    return tokens


@torch.inference_mode()
def generate_alone(reference: ModelAdapter, prompt: PreparedPrompt, max_new_tokens: int) -> list[int]:
    """Greedy `model.generate` of one prompt, ignoring end tokens: the oracle the engines must match."""
    from transformers import GenerationConfig

    inputs = reference.collate([prompt])
    # NOTE: an end token no vocabulary reaches, not min_new_tokens (which masks the real end tokens, so generate
    # would pick another token where an engine ignoring, not masking, them picks the end token; see paged_check)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2**31 - 1,
                              pad_token_id=0)
    output = reference.model.generate(**inputs, generation_config=config)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def engine_config(**overrides: object) -> EngineConfig:
    return EngineConfig(**{"max_num_batched_tokens": 96, **overrides})  # type: ignore[arg-type]
