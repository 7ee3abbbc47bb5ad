"""Faults (issue 6): an error while running one step fails that step's requests only (RuntimeError, CUDA/CPU
out-of-memory) and the next requests succeed; any other exception kills the engine: in-flight requests get
EngineDeadError, /health answers 503, and a real server process exits non-zero.

The faults are injected by patching the model runner or the core's step from the test (or from a launcher script
for the server process); production code has no test hooks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import REPO, ServerProcess
from tests.integration.engine.conftest import engine_config, image, request, user_turn
from vlmserve.config import Config, MediaConfig, ModelConfig
from vlmserve.engine.client import AsyncEngine
from vlmserve.engine.core import PagedEngineCore
from vlmserve.engine.protocol import CoreOutput
from vlmserve.errors import EngineDeadError, InternalError
from vlmserve.models.base import ModelAdapter
from vlmserve.models.loader import load_model
from vlmserve.multimodal.prompt import PromptRenderer
from vlmserve.types import FinishReason, GenerationRequest, PreparedPrompt

MAX_TOKENS = 6


class InjectedFatalError(Exception):
    """Not a RuntimeError: the engine treats it as a bug in itself and stops."""


@pytest.fixture(scope="module")
def adapter(tiny_qwen2_vl: Path) -> ModelAdapter:
    return load_model(ModelConfig(model=str(tiny_qwen2_vl)))


@pytest.fixture(scope="module")
def prompts(adapter: ModelAdapter) -> list[PreparedPrompt]:
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=adapter.max_model_len)
    return [renderer.render([user_turn(f"Describe picture {i}.", image(i))]) for i in range(3)]


def fail_next_calls(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, exc: BaseException,
                    times: int = 1) -> list[int]:
    """Make `target.name` raise `exc` on its next `times` calls, then behave; returns the call log."""
    original = getattr(target, name)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        if len(calls) <= times:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    return calls


def drive(core: PagedEngineCore, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], CoreOutput]]:
    """Step until idle; each request's tokens and its final output (finish_reason, error)."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    final: dict[str, CoreOutput] = {}

    def emit(outputs: list[CoreOutput]) -> None:
        for output in outputs:
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                final[output.request_id] = output

    for r in requests:
        core.add_request(r)
    for _ in range(1000):
        if not core.has_work():
            break
        core.step(emit)
    assert set(final) == set(tokens), "a request never finished"
    return {request_id: (tokens[request_id], final[request_id]) for request_id in tokens}


@pytest.mark.parametrize("exc", [RuntimeError("injected step failure"),
                                 torch.OutOfMemoryError("injected: out of memory")], ids=["runtime", "oom"])
def test_a_failing_step_fails_only_its_requests(adapter: ModelAdapter, prompts: list[PreparedPrompt],
                                                monkeypatch: pytest.MonkeyPatch, exc: RuntimeError) -> None:
    core = PagedEngineCore(adapter, engine_config(max_num_seqs=1))  # one running, the others wait
    reference = drive(core, [request("alone", prompts[1], max_tokens=MAX_TOKENS)])["alone"][0]
    calls = fail_next_calls(monkeypatch, core.runner, "execute", exc)
    results = drive(core, [request("victim", prompts[0], max_tokens=MAX_TOKENS),
                           request("bystander", prompts[1], max_tokens=MAX_TOKENS)])
    assert calls  # the fault really fired
    victim_tokens, victim = results["victim"]
    assert victim.finish_reason is FinishReason.ERROR and victim.error == type(exc).__name__ and not victim_tokens
    bystander_tokens, bystander = results["bystander"]
    assert bystander.finish_reason is FinishReason.LENGTH and bystander_tokens == reference
    after = drive(core, [request("after", prompts[1], max_tokens=MAX_TOKENS)])["after"]
    assert after[0] == reference and after[1].error is None
    stats = core.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == stats.num_waiting == 0


def make_engine(adapter: ModelAdapter, **config: Any) -> AsyncEngine:
    core = PagedEngineCore(adapter, engine_config(**config))
    return AsyncEngine(core, adapter.tokenizer, max_model_len=core.max_model_len, max_sequences=16)


async def collect(engine: AsyncEngine, generation: GenerationRequest) -> list[int]:
    tokens: list[int] = []
    async for delta in engine.generate(generation):
        tokens.extend(delta.token_ids)
    return tokens


def test_out_of_memory_through_the_async_engine_fails_one_request(
        adapter: ModelAdapter, prompts: list[PreparedPrompt], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(adapter, max_num_seqs=1)
    fail_next_calls(monkeypatch, engine._core.runner, "execute", torch.OutOfMemoryError("injected"))  # type: ignore[attr-defined]

    async def scenario() -> tuple[list[Any], list[int]]:
        engine.start()
        try:
            first = await asyncio.gather(collect(engine, request("a", prompts[0], max_tokens=MAX_TOKENS)),
                                         collect(engine, request("b", prompts[1], max_tokens=MAX_TOKENS)),
                                         return_exceptions=True)
            later = await collect(engine, request("c", prompts[2], max_tokens=MAX_TOKENS))
            return first, later
        finally:
            await engine.shutdown(5)

    (failed, served), later = asyncio.run(scenario())
    assert isinstance(failed, InternalError) and "Traceback" not in failed.message
    assert isinstance(served, list) and len(served) == MAX_TOKENS and len(later) == MAX_TOKENS
    assert not engine.is_dead


def test_a_fatal_error_kills_the_engine_and_health_turns_503(
        adapter: ModelAdapter, prompts: list[PreparedPrompt], monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmserve.api.app import build_app
    from vlmserve.multimodal.loader import MediaLoader

    engine = make_engine(adapter)
    core = engine._core  # type: ignore[attr-defined]
    original_step = core.step
    steps: list[int] = []

    def step(emit: Callable[[list[CoreOutput]], None]) -> None:
        steps.append(1)
        if len(steps) > 2:  # a prefill and a decode step go through, then the loop breaks
            raise InjectedFatalError("injected")
        original_step(emit)

    monkeypatch.setattr(core, "step", step)
    renderer = PromptRenderer(adapter.processor, image_token_id=adapter.image_token_id,
                              max_model_len=engine.max_model_len)

    async def scenario() -> tuple[Any, Any, httpx.Response, httpx.Response]:
        media = MediaLoader(MediaConfig())
        app = build_app(engine, renderer, media, Config(), ("tiny",))
        engine.start()
        try:
            healthy = await _get(app, "/health")
            assert healthy.status_code == 200
            in_flight = await asyncio.gather(
                collect(engine, request("x", prompts[0], max_tokens=50, ignore_eos=True)),
                collect(engine, request("y", prompts[1], max_tokens=50, ignore_eos=True)), return_exceptions=True)
            await asyncio.wait_for(engine.dead.wait(), 10)
            try:
                await collect(engine, request("z", prompts[2]))
                refused: Any = None
            except EngineDeadError as exc:
                refused = exc
            health = await _get(app, "/health")
            chat = await _post_chat(app)
            return in_flight, refused, health, chat
        finally:
            await engine.shutdown(1)
            await media.aclose()

    in_flight, refused, health, chat = asyncio.run(scenario())
    assert all(isinstance(result, EngineDeadError) for result in in_flight), in_flight
    assert isinstance(refused, EngineDeadError)
    assert engine.is_dead
    assert health.status_code == 503 and health.json() == {"status": "engine_dead"}
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "engine_dead"


async def _get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
        return await client.get(path)


async def _post_chat(app: Any) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
        return await client.post("/v1/chat/completions", json=body)


# --- a real server process --------------------------------------------------------------------------------------

LAUNCHER = textwrap.dedent("""
    # Test launcher: the paged core's step raises a fatal (non-RuntimeError) exception once two requests are in
    # flight and have taken two more steps, then `vlmserve serve` runs as usual.
    import sys

    from vlmserve.cli import main
    from vlmserve.engine import core

    original_step = core.PagedEngineCore.step
    steps_with_both = []


    class InjectedFatalError(Exception):
        pass


    def step(self, emit):
        if len(self._sequences) >= 2:
            steps_with_both.append(1)
            if len(steps_with_both) > 2:
                raise InjectedFatalError("injected by the test launcher")
        return original_step(self, emit)


    core.PagedEngineCore.step = step
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture
def dying_server(tiny_qwen2_vl: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    server = ServerProcess([str(tiny_qwen2_vl), "--served-model-name", "tiny", "--api-key", "k"],
                           program=[sys.executable, str(launcher)], env={"PYTHONPATH": str(REPO)})
    try:
        yield server
    finally:
        server.stop()


def test_server_process_exits_nonzero_when_its_engine_dies(dying_server: ServerProcess) -> None:
    process, base_url = dying_server.process, dying_server.base_url
    headers = {"Authorization": "Bearer k"}
    long = {"model": "tiny", "max_tokens": 500, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Talk for a long time."}]}
    results: dict[str, Any] = {}
    health_after: list[int | str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**long, "stream": True},
                          headers=headers, timeout=60) as response:
            results["stream"] = (response.status_code, [line for line in response.iter_lines() if line])

    def complete() -> None:
        time.sleep(0.3)  # the stream is running when this one arrives
        results["complete"] = httpx.post(f"{base_url}/v1/chat/completions", json=long, headers=headers, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the server is on its way out: it must never look healthy again
            try:
                health_after.append(httpx.get(f"{base_url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                health_after.append("refused")
                break
            time.sleep(0.01)

    threads = [threading.Thread(target=stream), threading.Thread(target=complete)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert process.wait(30) == 1

    status, lines = results["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    error_events = [json.loads(line[6:]) for line in lines if line.startswith("data: {\"error\"")]
    assert [event["error"]["code"] for event in error_events] == ["engine_dead"]
    complete_response = results["complete"]
    assert complete_response.status_code == 503 and complete_response.json()["error"]["code"] == "engine_dead"
    assert "Traceback" not in complete_response.text
    # NOTE: the process closes its socket within ~0.1 s of the death, so a 503 from /health is rarely seen here;
    # test_a_fatal_error_kills_the_engine_and_health_turns_503 checks the 503 itself, in process.
    assert 200 not in health_after and health_after[-1] == "refused"
    log = dying_server.log()
    assert "the engine died" in log and "InjectedFatalError" in log


def test_a_poisoned_request_in_a_batch_fails_alone(adapter: ModelAdapter, prompts: list[PreparedPrompt],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Whenever the poisoned request is in a step, the step fails; the engine isolates it and serves the rest."""
    core = PagedEngineCore(adapter, engine_config())
    expected = {f"ok{i}": drive(core, [request(f"ok{i}", prompts[i], max_tokens=MAX_TOKENS)])[f"ok{i}"][0]
                for i in (1, 2)}
    original = core.runner.execute

    def execute(chunks: list[Any]) -> Any:
        if any(c.sequence.request_id == "poison" for c in chunks):
            raise ValueError("injected: this request breaks the model")
        return original(chunks)

    monkeypatch.setattr(core.runner, "execute", execute)
    probes = fail_next_calls(monkeypatch, core, "_probe_succeeds", AssertionError("never raised"), times=0)
    with caplog.at_level(logging.WARNING, logger="vlmserve.engine.core"):
        results = drive(core, [request("ok1", prompts[1], max_tokens=MAX_TOKENS),
                               request("poison", prompts[0], max_tokens=MAX_TOKENS),
                               request("ok2", prompts[2], max_tokens=MAX_TOKENS)])
    logged = {(r.getMessage(), type(r.exc_info[1]).__name__ if r.exc_info else None) for r in caplog.records}
    assert logged == {("engine step of 3 sequences failed (ValueError); retrying them one by one", "ValueError"),
                      ("request failed in the engine: ValueError", "ValueError")}
    # a step of two where one fails alone: the other ran, so the engine works and needs no probe
    pair = drive(core, [request("ok3", prompts[1], max_tokens=2), request("poison", prompts[0], max_tokens=2)])
    assert pair["poison"][1].error == "ValueError" and pair["ok3"][1].error is None
    assert not probes  # some of the steps' sequences ran alone: the engine works, no probe needed
    assert results["poison"][1].finish_reason is FinishReason.ERROR and results["poison"][1].error == "ValueError"
    for name in ("ok1", "ok2"):
        assert results[name][1].finish_reason is FinishReason.LENGTH and results[name][0] == expected[name]
    stats = core.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_an_engine_that_fails_every_step_gives_up(adapter: ModelAdapter, prompts: list[PreparedPrompt],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    core = PagedEngineCore(adapter, engine_config())
    fail_next_calls(monkeypatch, core.runner, "execute", RuntimeError("injected: broken device"), times=10**6)
    for i in range(3):
        core.add_request(request(f"r{i}", prompts[i % len(prompts)], max_tokens=MAX_TOKENS))
    with pytest.raises(RuntimeError, match="consecutive steps"):
        for _ in range(10):
            core.step(lambda outputs: None)
            for i in range(2):  # keep work coming, as clients would
                core.add_request(request(f"more{_}-{i}", prompts[i], max_tokens=MAX_TOKENS))


def test_a_request_failing_alone_step_after_step_is_not_a_dead_engine(
        adapter: ModelAdapter, prompts: list[PreparedPrompt], monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 11: the "three failed steps" rule used to count a client's own failures; the core's health probe
    # (a prompt of its own) now decides whether the engine is broken.
    core = PagedEngineCore(adapter, engine_config())
    original = core.runner.execute

    def execute(chunks: list[Any]) -> Any:
        if any(chunk.sequence.request_id.startswith("bad") for chunk in chunks):
            raise RuntimeError("injected: this request cannot run")
        return original(chunks)

    monkeypatch.setattr(core.runner, "execute", execute)
    for attempt in range(5):
        (_, output), = drive(core, [request(f"bad-{attempt}", prompts[0], max_tokens=2)]).values()
        assert output.finish_reason is FinishReason.ERROR
    tokens, output = drive(core, [request("good", prompts[1], max_tokens=MAX_TOKENS)])["good"]
    assert output.error is None and len(tokens) == MAX_TOKENS


def test_an_engine_whose_probe_fails_too_gives_up_after_three_steps(
        adapter: ModelAdapter, prompts: list[PreparedPrompt], monkeypatch: pytest.MonkeyPatch) -> None:
    core = PagedEngineCore(adapter, engine_config())
    calls = fail_next_calls(monkeypatch, core.runner, "execute", RuntimeError("injected: broken device"), times=100)
    with pytest.raises(RuntimeError, match="health probe"):
        for attempt in range(3):
            drive(core, [request(f"r{attempt}", prompts[0], max_tokens=2)])
    assert len(calls) == 6  # each of the three steps: the request, then the probe


def test_only_consecutive_steps_where_the_engine_itself_failed_count(
        adapter: ModelAdapter, prompts: list[PreparedPrompt], monkeypatch: pytest.MonkeyPatch) -> None:
    core = PagedEngineCore(adapter, engine_config())
    original = core.runner.execute
    broken = {"device": False}

    def execute(chunks: list[Any]) -> Any:
        if broken["device"] or any(c.sequence.request_id.startswith("bad") for c in chunks):
            raise RuntimeError("injected")
        return original(chunks)

    monkeypatch.setattr(core.runner, "execute", execute)

    def run(name: str, *, device: bool) -> CoreOutput:
        broken["device"] = device
        return drive(core, [request(name, prompts[0], max_tokens=1)])[name][1]

    for round_ in range(2):  # two engine failures, then a success of either kind restarts the count
        assert run(f"dead-{round_}-a", device=True).finish_reason is FinishReason.ERROR
        assert run(f"dead-{round_}-b", device=True).finish_reason is FinishReason.ERROR
        if round_ == 0:
            assert run("fine", device=False).error is None  # a good step
        else:
            assert run("bad-alone", device=False).error == "RuntimeError"  # a request's own failure, probe passes
    run("dead-2-a", device=True)
    run("dead-2-b", device=True)
    with pytest.raises(RuntimeError, match=r"^every sequence and the health probe failed in several consecutive "
                                           r"steps$"):
        run("dead-2-c", device=True)
