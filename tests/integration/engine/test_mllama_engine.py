"""The paged engine on Mllama (tiny Llama 3.2 Vision): cross-attention layers read each sequence's own vision K/V,
kept beside the paged cache. Whatever the engine does to a sequence — batch it with text-only prompts, chunk its
prompt, preempt it, look its blocks up in the prefix cache — its logprobs equal the model's own `generate`.

(The family also runs in tests/integration/models/test_paged_logprobs.py: multi-turn, several images per turn.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from tests.integration.engine.conftest import engine_config, image, request, user_turn
from vlmserve.config import ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.paged_check import reference_logprobs
from vlmserve.engine.protocol import CoreOutput
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import ChatMessage, PreparedPrompt, TextPart

pytestmark = pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")  # Mllama's vision layers

MAX_TOKENS = 6
TOLERANCE = 1e-5
REPLY = ChatMessage("assistant", (TextPart("The first one is darker."),))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["mllama"].build(tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def prompts(checkpoint: Path) -> dict[str, PreparedPrompt]:
    adapter = load_model(ModelConfig(model=str(checkpoint)))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, max_images_per_prompt=adapter.max_images_per_prompt)
    return {
        "one_image": renderer.render([user_turn("Describe this picture, please.", image(1, (112, 84)))]),
        "text_only": renderer.render([ChatMessage("user", (TextPart("Tell me a story about a small boat."),))]),
        # the second turn's images come after text that saw only the first turn's image
        "two_turns": renderer.render([user_turn("What is this?", image(2, (84, 112))), REPLY,
                                      user_turn("And these two?", image(3, (98, 98)), image(4, (112, 84)))]),
        # differs from one_image only in its image
        "other_image": renderer.render([user_turn("Describe this picture, please.", image(5, (112, 84)))]),
    }


@pytest.fixture(scope="module")
def expected(checkpoint: Path, prompts: dict[str, PreparedPrompt]) -> dict[str, tuple[list[int], torch.Tensor]]:
    reference = load_model(ModelConfig(model=str(checkpoint)))  # a copy no paged core installs its attention into
    return {name: reference_logprobs(reference, prompt, MAX_TOKENS) for name, prompt in prompts.items()}


@pytest.fixture
def adapter(checkpoint: Path) -> ModelAdapter:
    return load_model(ModelConfig(model=str(checkpoint)))


def _run(core: PagedEngineCore, prompts: dict[str, PreparedPrompt]) -> dict[str, list[tuple[int, float]]]:
    """Every prompt at once, greedy; per request its (token, logprob) pairs."""
    got: dict[str, list[tuple[int, float]]] = {name: [] for name in prompts}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            assert output.error is None, output.error
            got[output.request_id] += [(lp.chosen.token_id, lp.chosen.logprob) for lp in output.new_logprobs or []
                                       if lp is not None]

    for name, prompt in prompts.items():
        core.add_request(request(name, prompt, max_tokens=MAX_TOKENS, logprobs=True))
    while core.has_work():
        core.step(emit)
    return got


def _assert_equal(got: dict[str, list[tuple[int, float]]], expected: dict[str, tuple[list[int], torch.Tensor]]
                  ) -> None:
    for name, pairs in got.items():
        tokens, logprobs = expected[name]
        assert [t for t, _ in pairs] == tokens, name
        error = max(abs(lp - float(logprobs[i, t])) for i, (t, lp) in enumerate(pairs))
        assert error <= TOLERANCE, f"{name}: largest logprob difference {error:.3g}"


def test_image_and_text_only_prompts_batched_together(adapter: ModelAdapter, prompts: dict[str, PreparedPrompt],
                                                      expected: dict[str, tuple[list[int], torch.Tensor]]) -> None:
    """Text-only rows skip the cross-attention layers (as the model does without images) while image rows of the
    same steps attend their own request's K/V under their own tile masks (one_image and other_image: K/V of the
    same shape, so attending the wrong request's would not fail loudly); prefills are chunked (16 tokens a step)."""
    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=16))
    names = ("one_image", "other_image", "text_only", "two_turns")
    _assert_equal(_run(core, {name: prompts[name] for name in names}), expected)
    assert len(core.kv.cross_kv or ()) == 0  # every finished sequence's cross K/V went with it


def test_preempted_sequences_rebuild_their_cross_kv(adapter: ModelAdapter, prompts: dict[str, PreparedPrompt],
                                                    expected: dict[str, tuple[list[int], torch.Tensor]]) -> None:
    names = ("one_image", "other_image", "text_only")
    longest = max(prompts[name].num_tokens for name in names) + MAX_TOKENS
    # room for the longest sequence and a bit: the others must take turns
    core = PagedEngineCore(adapter, engine_config(num_kv_blocks=-(-longest // 4) + 3, block_size=4,
                                                  enable_prefix_caching=False))
    store = core.kv.cross_kv
    assert store is not None
    built: list[str] = []
    put = store.put
    store.put = lambda sequence, kv: (built.append(sequence.request_id), put(sequence, kv))[1]  # type: ignore[method-assign]
    got = _run(core, {name: prompts[name] for name in names})
    assert core.stats().num_preemptions > 0
    assert sorted(built) != sorted(set(built)), f"no image request was preempted and rebuilt: {built}"
    _assert_equal(got, expected)
    assert len(core.kv.cross_kv or ()) == 0


def test_prompts_differing_only_in_their_image_share_no_block(
        adapter: ModelAdapter, prompts: dict[str, PreparedPrompt],
        expected: dict[str, tuple[list[int], torch.Tensor]]) -> None:
    """Every row of Mllama attends the vision states (rows before the <|image|> token attend all tiles evenly), so
    not even the blocks before the image may be shared between prompts with different images."""
    core = PagedEngineCore(adapter, engine_config(block_size=4))
    _run(core, {"one_image": prompts["one_image"]})
    got = _run(core, {"other_image": prompts["other_image"]})
    assert core.stats().prefix_cache_hits == 0
    _assert_equal(got, expected)
    again = _run(core, {"one_image": prompts["one_image"]})  # the same prompt again does find its blocks
    assert core.stats().prefix_cache_hits > 0
    _assert_equal(again, expected)
