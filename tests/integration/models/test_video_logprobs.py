"""Video prompts on the paged engine: per-token logprobs equal the model's own `generate`, per video family
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V, GLM-4.5V, LLaVA-NeXT-Video, LLaVA-OneVision).

Per family (tiny random weights, float32, CPU), as tests/integration/models/test_paged_logprobs.py does for
images: a video prompt and a video + image prompt run concurrently through the paged engine (chunked prefill mixed
with decode, prefix cache on), greedy, 8 tokens each; every generated position's logprobs must equal the
log-softmax of `model.generate(output_logits=True)` within 1e-5, with the video tokens placed through the
processor's video path (`videos=`, the family's video token, M-RoPE temporal positions). A third prompt has the
same tokens as the first but another video: had the prefix-cache key left the video out, it would reuse the first
video's KV and its logprobs would be wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny.registry import FAMILIES
from tests.fixtures.videos import make_video
from tests.integration.engine.conftest import engine_config, image
from tests.integration.models.test_paged_logprobs import MAX_TOKENS, TOLERANCE, _largest_difference, _run
from vlmserve.config import EngineConfig, ModelConfig
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.kv_cache import extend_block_hashes
from vlmserve.engine.paged_check import reference_logprobs
from vlmserve.errors import UnsupportedFeatureError
from vlmserve.models.loader import load_model
from vlmserve.models.vision_budget import split_video_groups
from vlmserve.multimodal.decode import image_hash
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.multimodal.video import VideoLimits, decode_video
from vlmserve.types import ChatMessage, ImagePart, PreparedPrompt, TextPart, VideoPart

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "llava_next_video",
                  "llava_onevision")


def _video(seed: int) -> VideoPart:
    """8 frames of 84x56 at 4 fps, sampled at 2 fps: 4 frames, 2 temporal groups of 3x2 merged patches."""
    data = make_video(8, size=(84, 56), fps=4, seed=seed)
    return decode_video(data, VideoLimits(60, 16, 10**6, 10**6), fps=2, max_frames=16, param="p")


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_video_logprobs_equal_generate(name: str, tmp_path: Path) -> None:
    adapter = load_model(ModelConfig(model=str(FAMILIES[name].build(tmp_path / name))))
    assert adapter.video_token_id is not None and adapter.paged_support() is None
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, video_token_id=adapter.video_token_id)
    first, second = _video(0), _video(1)
    picture = image(3, (84, 56))
    reply = ChatMessage("assistant", (TextPart("A square changes colour."),))
    with_image = ChatMessage("user", (ImagePart(picture, image_hash(picture)), TextPart("This, and"), first,
                                      TextPart("this?")))
    if adapter.video_token_id == adapter.image_token_id:  # GLM-4.1V: its own forward takes one or the other
        with pytest.raises(UnsupportedFeatureError, match="images or videos in one conversation, not both"):
            renderer.render([with_image])
        with_image = ChatMessage("user", (TextPart("Look:"), first, TextPart("Describe it.")))
    conversations = [
        [ChatMessage("user", (first, TextPart("What happens?"))), reply,
         ChatMessage("user", (TextPart("And then?"),))],
        [with_image],
        [ChatMessage("user", (second, TextPart("What happens?"))), reply,
         ChatMessage("user", (TextPart("And then?"),))],
    ]
    prompts = [renderer.render(c) for c in conversations]
    if "video_grid_thw" in prompts[0].model_inputs:  # two temporal groups: M-RoPE positions move in time
        assert int(prompts[0].model_inputs["video_grid_thw"][0, 0]) == 2
    assert prompts[0].num_video_tokens > 0 and prompts[1].video_spans
    # same tokens, different video: only the video hash tells them apart in the prefix-cache key
    assert prompts[0].token_ids == prompts[2].token_ids and prompts[0].video_hashes != prompts[2].video_hashes
    expected = [reference_logprobs(adapter, p, MAX_TOKENS) for p in prompts]

    core = PagedEngineCore(adapter, engine_config(max_num_batched_tokens=48))
    got = _run(core, {"a": prompts[0], "b": prompts[1]})
    got |= _run(core, {"c": prompts[2]})
    errors = [_largest_difference(got[r], *expected[i]) for i, r in enumerate("abc")]
    assert max(errors) <= TOLERANCE, f"{name}: largest logprob difference {max(errors):.3g}"
    if prompts[2].video_spans[0].start >= EngineConfig().block_size:
        assert core.stats().prefix_cache_hits > 0  # "c" reused the blocks before its video, and only those
    again = _run(core, {"d": prompts[0]})  # the same video again: its blocks come from the prefix cache
    assert _largest_difference(again["d"], *expected[0]) <= TOLERANCE
    stats = core.stats()  # videos share the embedding cache with images but are counted apart
    assert stats.video_cache_hits + stats.video_cache_misses >= 3 and stats.video_cache_misses >= 2
    assert stats.image_cache_hits + stats.image_cache_misses <= sum(len(p.image_hashes) for p in prompts)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "glm4v"])
def test_video_tower_cut_between_temporal_groups_is_exact(name: str, tmp_path: Path) -> None:
    """Videos larger than the vision patch budget are encoded in several tower calls; the features match."""
    adapter = load_model(ModelConfig(model=str(FAMILIES[name].build(tmp_path / name))))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, video_token_id=adapter.video_token_id)
    prompt = renderer.render([ChatMessage("user", (_video(0), TextPart("?")))])
    pixels, grid = prompt.model_inputs["pixel_values_videos"], prompt.model_inputs["video_grid_thw"]
    per_group = int(grid[0, 1] * grid[0, 2])
    calls = split_video_groups(pixels, grid, per_group)
    assert len(calls) == int(grid[0, 0]) >= 2
    whole = adapter._features(adapter._base.get_video_features, {"pixel_values_videos": pixels,
                                                                 "video_grid_thw": grid})
    cut = torch.cat([adapter._features(adapter._base.get_video_features, call) for call in calls])
    torch.testing.assert_close(cut, whole, rtol=0, atol=1e-5)


def test_prefix_cache_key_covers_the_video(tmp_path: Path) -> None:
    """Same text, same video → same block hashes; another video → the blocks from its first token on differ."""
    adapter = load_model(ModelConfig(model=str(FAMILIES["qwen2_vl"].build(tmp_path / "qwen2_vl"))))
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, video_token_id=adapter.video_token_id)

    def hashes(video: VideoPart) -> tuple[list[bytes], PreparedPrompt]:
        prompt = renderer.render([ChatMessage("user", (TextPart("Watch this closely, please:"), video,
                                                       TextPart("What happens?")))])
        return extend_block_hashes([], lambda s, e: prompt.token_ids[s:e], prompt.num_tokens, prompt, None, 4), prompt

    (same_a, prompt), (same_b, _), (other, _) = hashes(_video(0)), hashes(_video(0)), hashes(_video(1))
    assert same_a == same_b
    first_video_block = prompt.video_spans[0].start // 4
    assert other[:first_video_block] == same_a[:first_video_block]
    assert all(x != y for x, y in zip(other[first_video_block:], same_a[first_video_block:], strict=True))


def test_a_family_without_a_video_path_refuses_videos_clearly(tmp_path: Path) -> None:
    adapter = load_model(ModelConfig(model=str(FAMILIES["llava"].build(tmp_path / "llava"))))
    assert adapter.video_token_id is None
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len, video_token_id=adapter.video_token_id,
                              model_family=adapter.family)
    with pytest.raises(UnsupportedFeatureError, match="video input is not supported for llava models"):
        renderer.render([ChatMessage("user", (_video(0), TextPart("What happens?")))])
