"""The engine core's inbox: requests stamped on arrival, requests and aborts drained once each, in order."""

from __future__ import annotations

import time

from vlmserve.engine.inbox import Inbox
from vlmserve.types import GenerationRequest, PreparedPrompt, SamplingParams


def request(request_id: str) -> GenerationRequest:
    prompt = PreparedPrompt(token_ids=[1, 2, 3])
    return GenerationRequest(request_id=request_id, prompt=prompt, sampling=SamplingParams(max_tokens=1))


def test_requests_and_aborts_are_taken_once_in_arrival_order() -> None:
    inbox = Inbox()
    assert inbox.is_empty() and inbox.take() == ([], [])
    first, second = request("a"), request("b")
    first.arrival_time = second.arrival_time = 0.0  # the queue starts at add(), not when the object was made
    before = time.monotonic()
    inbox.add(first)
    inbox.add(second)
    assert before <= first.arrival_time <= second.arrival_time <= time.monotonic()
    assert not inbox.is_empty()
    requests, aborts = inbox.take()
    assert [r.request_id for r in requests] == ["a", "b"] and aborts == []
    assert inbox.is_empty() and inbox.take() == ([], [])


def test_an_abort_alone_makes_the_inbox_non_empty() -> None:
    inbox = Inbox()
    inbox.abort("x")
    inbox.abort("y")
    assert not inbox.is_empty()
    assert inbox.take() == ([], ["x", "y"])
    assert inbox.is_empty()
    inbox.add(request("z"))
    assert not inbox.is_empty()
