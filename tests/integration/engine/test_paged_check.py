"""The load-time self-check (engine/paged_check.py): a good family spec passes, a broken one is caught and the
server falls back to the generate engine with the reason logged."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.integration.engine.conftest import Loaded, engine_config, request, run_core
from vlmserve.config import Config, EngineConfig
from vlmserve.engine.generate_core import GenerateEngineCore
from vlmserve.engine.paged_check import check_paged_engine
from vlmserve.models.hf import HFAdapter
from vlmserve.serve import make_engine_core, self_check_prompt


def _scaled_head(factor: float) -> Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]:
    """A hand-written head off by `factor`: what a family with Granite's logits_scaling got from a bare lm_head."""

    def factory(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda hidden: model.lm_head(hidden).float() * factor

    return factory


def _with_spec(adapter: HFAdapter, **changes: Any) -> HFAdapter:
    assert adapter.spec is not None
    adapter.spec = dataclasses.replace(adapter.spec, **changes)
    return adapter


@pytest.fixture
def fresh(loaded: Callable[[str], Loaded]) -> Callable[[str], HFAdapter]:
    """A freshly loaded adapter per test: the tests change its spec."""

    def get(name: str) -> HFAdapter:
        adapter = loaded(name).fresh_adapter()
        assert isinstance(adapter, HFAdapter)
        return adapter

    return get


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_a_good_spec_passes(name: str, fresh: Callable[[str], HFAdapter]) -> None:
    adapter = fresh(name)
    prompt = self_check_prompt(adapter)
    assert len(prompt.image_hashes) == 2
    result = check_paged_engine(adapter, prompt, EngineConfig())
    assert result.reason is None
    assert result.num_positions == 3 and result.max_error < 1e-4


@pytest.mark.parametrize("name, changes, why", [
    ("qwen2_vl", {"positions": "arange"}, "1-D positions on an M-RoPE model"),
    ("qwen2_vl", {"positions": "arange", "num_position_rows": 1}, "one position row on an M-RoPE model"),
    ("qwen2_vl", {"num_position_rows": 4}, "four rows where get_rope_index gives three"),
    ("llava", {"head": _scaled_head(8.0)}, "a head missing the model's logit scaling"),
    ("glm4v", {"head": _scaled_head(1.01)}, "a head off by 1 %"),
    ("llava", {"decoder": "vision_tower"}, "the wrong module as decoder"),
])
def test_a_broken_spec_is_caught(name: str, changes: dict[str, Any], why: str,
                                 fresh: Callable[[str], HFAdapter]) -> None:
    adapter = _with_spec(fresh(name), **changes)
    result = check_paged_engine(adapter, self_check_prompt(adapter), EngineConfig())
    assert result.reason is not None, f"self-check passed {why}"


def test_the_server_falls_back_to_generate_with_the_reason_logged(fresh: Callable[[str], HFAdapter],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    adapter = _with_spec(fresh("qwen2_vl"), positions="arange")
    with caplog.at_level(logging.INFO, logger="vlmserve"):
        core = make_engine_core(adapter, Config())
    assert isinstance(core, GenerateEngineCore)
    assert any("generate fallback" in r.message and "logprobs differ" in r.message for r in caplog.records)
    # The check put the decoder back on its own attention: the fallback generates.
    prompt = self_check_prompt(adapter)
    assert len(run_core(core, [request("after-check", prompt, max_tokens=3)])["after-check"]) == 3


def test_engine_paged_refuses_to_start_on_a_failed_check(fresh: Callable[[str], HFAdapter]) -> None:
    adapter = _with_spec(fresh("llava"), head=_scaled_head(8.0))
    with pytest.raises(SystemExit, match="logprobs differ"):
        make_engine_core(adapter, Config(engine=EngineConfig(engine="paged")))


def test_a_passing_check_serves_paged_and_leaves_nothing_behind(fresh: Callable[[str], HFAdapter]) -> None:
    from vlmserve.engine.core import PagedEngineCore

    adapter = fresh("llava")
    core = make_engine_core(adapter, Config(engine=engine_config()))
    assert isinstance(core, PagedEngineCore)
    assert core.stats().num_finished == 0 and core.stats().num_generated_tokens == 0


def test_a_short_context_checks_with_fewer_images(fresh: Callable[[str], HFAdapter]) -> None:
    from vlmserve.engine.core import PagedEngineCore

    adapter = fresh("llava")
    full = self_check_prompt(adapter)
    assert full is not None and len(full.image_hashes) == 2
    adapter.max_model_len = full.num_tokens  # two images no longer leave room for the generated tokens
    shorter = self_check_prompt(adapter, max_tokens=adapter.max_model_len - 3)
    assert shorter is not None and len(shorter.image_hashes) == 1
    assert isinstance(make_engine_core(adapter, Config(engine=engine_config())), PagedEngineCore)
    adapter.max_model_len = 4
    with pytest.raises(SystemExit, match="no self-check prompt fits"):
        make_engine_core(adapter, Config(engine=EngineConfig(engine="paged")))


def test_the_check_compares_every_alternative_in_a_small_throwaway_engine(
        fresh: Callable[[str], HFAdapter], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from vlmserve.engine import core as core_module
    from vlmserve.engine import paged_check

    adapter = fresh("llava")
    prompt = self_check_prompt(adapter)
    configs: list[EngineConfig] = []
    positions: list[Any] = []
    original_init, original_logprobs = core_module.PagedEngineCore.__init__, paged_check.paged_logprobs

    def init(self: Any, adapter: Any, config: EngineConfig) -> None:
        configs.append(config)
        original_init(self, adapter, config)

    def logprobs(*args: Any, **kwargs: Any) -> Any:
        positions.extend(original_logprobs(*args, **kwargs))
        return positions

    monkeypatch.setattr(core_module.PagedEngineCore, "__init__", init)
    monkeypatch.setattr(paged_check, "paged_logprobs", logprobs)
    config = EngineConfig(num_kv_blocks=500, enable_cuda_graphs=True, max_num_seqs=8)
    with caplog.at_level(logging.INFO, logger="vlmserve"):
        result = check_paged_engine(adapter, prompt, config)
    assert result.reason is None and 0 <= result.seconds < 600
    # sized for the prompt and the checked tokens plus one block, one sequence, nothing cached or graphed
    (small,) = configs
    assert small.num_kv_blocks == -(-(prompt.num_tokens + 3) // config.block_size) + 1
    assert (small.enable_cuda_graphs, small.enable_prefix_caching, small.max_num_seqs) == (False, False, 1)
    assert len(positions) == 3 and all(len(p.top) == paged_check.NUM_TOP_LOGPROBS for p in positions)
    # the throwaway engine's KV-size notes are not logged as the server's
    assert not [r for r in caplog.records if r.name == core_module.__name__ and r.levelno < logging.ERROR]


def test_the_models_end_tokens_do_not_cut_the_check_short(fresh: Callable[[str], HFAdapter]) -> None:
    from vlmserve.engine.paged_check import reference_logprobs

    adapter = fresh("llava")
    prompt = self_check_prompt(adapter)
    tokens, _ = reference_logprobs(adapter, prompt, 3)
    adapter.eos_token_ids = frozenset({tokens[0]})  # greedy decoding ends on its first token
    result = check_paged_engine(adapter, prompt, EngineConfig())
    assert result.reason is None and result.num_positions == 3


def test_a_failure_of_the_paged_path_is_the_reason_and_the_attention_is_restored(
        fresh: Callable[[str], HFAdapter], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from vlmserve.engine.model_runner import ModelRunner
    from vlmserve.models.hf_compat import attention_name

    adapter = fresh("llava")
    before = attention_name(adapter.text_model.config)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(ModelRunner, "execute", fail)
    with caplog.at_level(logging.DEBUG, logger="vlmserve.engine.paged_check"):
        result = check_paged_engine(adapter, self_check_prompt(adapter), EngineConfig())
    # the core fails the request with the exception's type name, which the check re-raises and reports
    assert result.reason == "the paged engine failed on the self-check prompt (RuntimeError: RuntimeError)"
    assert (result.max_error, result.num_positions) == (math.inf, 0) and 0 <= result.seconds < 600
    (record,) = [r for r in caplog.records if r.name == "vlmserve.engine.paged_check"]
    assert record.getMessage() == "paged self-check failed" and record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert attention_name(adapter.text_model.config) == before is not None  # put back for the generate engine


def test_a_mismatch_names_the_tolerance_and_the_dtype(fresh: Callable[[str], HFAdapter]) -> None:
    adapter = _with_spec(fresh("llava"), head=_scaled_head(8.0))
    result = check_paged_engine(adapter, self_check_prompt(adapter), EngineConfig())
    assert result.reason is not None and result.reason.startswith("the paged engine's logprobs differ from "
                                                                  "model.generate's by up to ")
    assert result.reason.endswith("on the self-check prompt (tolerance 0.0001 + 0·|logprob| for float32): the "
                                  "family's paged spec does not match this model")
    assert result.num_positions >= 1 and 0 <= result.seconds < 600
