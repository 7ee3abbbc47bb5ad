"""Our async load generator for OpenAI-compatible streaming chat servers (`vllm bench serve` metrics).

Closed loop: a semaphore keeps `concurrency` requests in flight until `num_requests` have been sent. Each run
has a time cap: at the cap, requests still running are cancelled and reported as such, and the run is marked
truncated (throughput then counts the requests that finished within the cap).

    python3 -m bench.loadgen --base-url http://127.0.0.1:8000 --model bench --workload w1 --concurrency 8 \
        --num-requests 80 --tokenizer /tmp/qwen25vl7b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.metrics import RequestResult, summarize, summarize_turns
from bench.workloads import (
    Dialect,
    RequestOptions,
    conversation_messages,
    data_uri,
    noise_image_png,
    request_body,
    single_image_bodies,
)

Sender = Callable[[dict[str, Any], RequestResult, float], Awaitable[None]]


def _handle_event(data: str, result: RequestResult, now: float) -> bool:
    """Fold one SSE `data:` payload into `result`; returns False at the end of the stream."""
    if data == "[DONE]":
        return False
    event = json.loads(data)
    if "error" in event:
        raise RuntimeError(f"server error in stream: {event['error']}")
    for choice in event.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if result.ttft_s is None:
                result.ttft_s = now - result.start_s
            result.chunk_times_s.append(now)
            result.text += content
    usage = event.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.output_tokens = usage.get("completion_tokens")
        result.is_usage_reported = True
    return True


def _finish(result: RequestResult, now: float) -> None:
    result.e2e_s = now - result.start_s
    if not result.is_usage_reported:
        # NOTE: without usage, count content chunks as tokens (exact only for one-token-per-chunk servers).
        result.output_tokens = len(result.chunk_times_s)
    result.is_success = result.ttft_s is not None
    if not result.is_success:
        result.error = "stream ended without content"


def make_aiohttp_sender(session: Any, url: str, clock: Callable[[], float]) -> Sender:
    async def send(body: dict[str, Any], result: RequestResult, timeout_s: float) -> None:
        import aiohttp

        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:500]}")
            buffer = b""
            async for raw in response.content:
                buffer += raw
                if not buffer.endswith(b"\n"):
                    continue
                line, buffer = buffer.strip(), b""
                if line.startswith(b"data:") and not _handle_event(line[5:].strip().decode(), result, clock()):
                    break
        _finish(result, clock())

    return send


def make_httpx_sender(client: Any, url: str, clock: Callable[[], float]) -> Sender:
    async def send(body: dict[str, Any], result: RequestResult, timeout_s: float) -> None:
        async with client.stream("POST", url, json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data:") and not _handle_event(line[5:].strip(), result, clock()):
                    break
        _finish(result, clock())

    return send


class LoadGenerator:
    """Sends chat-completion bodies to one server and records per-request timings."""

    def __init__(self, base_url: str, *, request_timeout_s: float = 600.0) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.request_timeout_s = request_timeout_s
        self._t0 = time.perf_counter()
        self._client: Any = None
        self._send: Sender | None = None

    def clock(self) -> float:
        return time.perf_counter() - self._t0

    async def __aenter__(self) -> LoadGenerator:
        try:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=0)
            self._client = aiohttp.ClientSession(connector=connector)
            self._send = make_aiohttp_sender(self._client, self.url, self.clock)
        except ImportError:
            import httpx

            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
            self._send = make_httpx_sender(self._client, self.url, self.clock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        close = getattr(self._client, "close", None) or self._client.aclose
        await close()

    async def one(self, body: dict[str, Any], index: int = 0, **labels: Any) -> RequestResult:
        result = RequestResult(index=index, start_s=self.clock(), **labels)
        assert self._send is not None
        try:
            await self._send(body, result, self.request_timeout_s)
        except asyncio.CancelledError:
            result.error = "cancelled"
            raise
        except Exception as exc:  # a failed request is a result, not a crash of the benchmark
            result.error = f"{type(exc).__name__}: {exc}"[:500]
            result.e2e_s = self.clock() - result.start_s
        return result

    async def closed_loop(self, bodies: list[dict[str, Any]], *, concurrency: int,
                          max_duration_s: float) -> dict[str, Any]:
        """Send `bodies` with at most `concurrency` in flight; stop at `max_duration_s`."""
        semaphore = asyncio.Semaphore(concurrency)
        slots: list[RequestResult | None] = [None] * len(bodies)  # None: never sent
        start = self.clock()

        async def worker(index: int, body: dict[str, Any]) -> None:
            async with semaphore:
                # Stays "cancelled" if the time cap cancels this request mid-stream.
                slots[index] = RequestResult(index=index, start_s=self.clock(), error="cancelled")
                slots[index] = await self.one(body, index)

        tasks = [asyncio.create_task(worker(i, body)) for i, body in enumerate(bodies)]
        _, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results = [r for r in slots if r is not None]
        done = [r for r in results if r.is_success]
        end = self.clock() if pending else max((r.end_s for r in done), default=self.clock())
        summary = summarize(results, end - start)
        summary.update(concurrency=concurrency, num_requests=len(bodies), is_truncated=bool(pending),
                       max_duration_s=max_duration_s, errors=_first_errors(results))
        return summary

    async def conversations(self, *, num_conversations: int, num_turns: int, options: RequestOptions,
                            seed: int, max_duration_s: float) -> dict[str, Any]:
        """W3: conversations one after another, each turn re-sending the whole history and the image."""
        results: list[RequestResult] = []
        start = self.clock()

        async def run_all() -> None:
            for conversation in range(num_conversations):
                image = data_uri(noise_image_png(seed * 7919 + conversation))
                answers: list[str] = []
                for turn in range(1, num_turns + 1):
                    body = request_body(conversation_messages(image, answers), options)
                    result = await self.one(body, len(results), turn=turn, conversation=conversation)
                    results.append(result)
                    if not result.is_success:
                        return
                    answers.append(result.text)

        try:
            await asyncio.wait_for(run_all(), timeout=max_duration_s)
            is_truncated = False
        except asyncio.TimeoutError:
            is_truncated = True
        summary = summarize(results, self.clock() - start)
        summary.update(turns=summarize_turns(results), num_conversations=num_conversations, num_turns=num_turns,
                       is_truncated=is_truncated, max_duration_s=max_duration_s, errors=_first_errors(results))
        return summary


def _first_errors(results: list[RequestResult], limit: int = 3) -> list[str]:
    errors = [r.error for r in results if r.error and r.error != "cancelled"]
    return list(dict.fromkeys(errors))[:limit]


async def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    options = RequestOptions(model=args.model, max_tokens=args.max_tokens, dialect=args.dialect)
    async with LoadGenerator(args.base_url) as generator:
        if args.workload == "w3":
            return await generator.conversations(num_conversations=args.num_requests, num_turns=args.num_turns,
                                                 options=options, seed=args.seed, max_duration_s=args.max_duration_s)
        bodies = single_image_bodies(args.num_requests, options, seed=args.seed, tokenizer=tokenizer)
        return await generator.closed_loop(bodies, concurrency=args.concurrency, max_duration_s=args.max_duration_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True, help="the `model` field the server expects")
    parser.add_argument("--workload", choices=["w1", "w2", "w3"], default="w1")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=10, help="requests (w1/w2) or conversations (w3)")
    parser.add_argument("--num-turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-duration-s", type=float, default=120.0)
    parser.add_argument("--dialect", choices=[Dialect.OPENAI, Dialect.TRANSFORMERS_SERVE], default=Dialect.OPENAI)
    parser.add_argument("--tokenizer", default=None, help="model directory, to size prompts to ~100 tokens exactly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    summary = asyncio.run(run_cli(args))
    text = json.dumps(summary, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
