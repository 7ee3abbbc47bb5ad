"""Admission of requests by client and by memory, before any expensive work starts.

Three limits, all answered 429 with Retry-After and an OpenAI error body:
- the server's capacity in sequences (`--max-num-seqs` + `--max-waiting-requests`), checked by the engine;
- each client's share (`--max-sequences-per-client`, `--max-tokens-per-client`): a client is its API key, or its
  address when the server has no keys. By default, with keys, each key may hold the capacity divided by the number
  of keys, so no key can fill the queue and leave another nothing but 429s;
- a byte budget (`--max-preparing-bytes`) for the memory requests hold before and while they run: decoded images
  of requests still being prepared, and the image tensors of requests in the engine.

A `Ticket` stands for one request while it is prepared; it is released when preparation ends, successful or not
(the engine then accounts for what the request keeps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vlmserve.config import Config
from vlmserve.engine.client import EngineClient
from vlmserve.errors import QuotaExceededError, ServerBusyError

_RETRY_AFTER_S = 1.0


@dataclass
class Ticket:
    """One request being prepared: its client, sequences, tokens and the bytes it holds so far."""

    client_id: str | None
    num_sequences: int
    num_tokens: int
    num_bytes: int = 0
    released: bool = field(default=False)


class Admission:
    """Per-client quotas and the preparation byte budget, shared by every route that generates."""

    def __init__(self, engine: EngineClient, config: Config) -> None:
        self._engine = engine
        server = config.server
        capacity = config.engine.max_num_seqs + config.engine.max_waiting_requests
        num_keys = len(server.resolved_api_keys())
        self.max_sequences_per_client = server.max_sequences_per_client
        if self.max_sequences_per_client is None and num_keys > 1:
            self.max_sequences_per_client = max(server.max_n, capacity // num_keys)
        self.max_tokens_per_client = server.max_tokens_per_client
        self.max_bytes = server.max_preparing_bytes
        self._sequences: Counter[str | None] = Counter()
        self._tokens: Counter[str | None] = Counter()
        self._bytes = 0

    @property
    def num_preparing(self) -> int:
        return sum(self._sequences.values())

    def admit(self, client_id: str | None, num_sequences: int, num_tokens: int) -> Ticket:
        """A ticket for a request of `num_sequences` sequences and `num_tokens` tokens (prompt + max_tokens, times
        n), or QuotaExceededError / ServerBusyError / the engine's own refusal."""
        self._engine.check_can_accept(num_sequences, num_reserved=self.num_preparing)
        in_engine, engine_tokens = self._engine.client_load(client_id)
        limit = self.max_sequences_per_client
        if limit is not None and in_engine + self._sequences[client_id] + num_sequences > limit:
            raise QuotaExceededError(
                f"this client already has {in_engine + self._sequences[client_id]} sequences running or waiting; "
                f"each API key (or address) may have at most {limit} (--max-sequences-per-client)",
                retry_after_s=_RETRY_AFTER_S)
        token_limit = self.max_tokens_per_client
        if token_limit is not None and engine_tokens + self._tokens[client_id] + num_tokens > token_limit:
            raise QuotaExceededError(
                f"this request would bring this client's tokens in flight (prompt plus max_tokens, times n) above "
                f"{token_limit} (--max-tokens-per-client)", retry_after_s=_RETRY_AFTER_S)
        self._check_bytes(0)
        self._sequences[client_id] += num_sequences
        self._tokens[client_id] += num_tokens
        return Ticket(client_id, num_sequences, num_tokens)

    def hold_bytes(self, ticket: Ticket, num_bytes: int) -> None:
        """Count `num_bytes` more for `ticket`; ServerBusyError (and nothing counted) if that breaks the budget."""
        self._check_bytes(num_bytes)
        ticket.num_bytes += num_bytes
        self._bytes += num_bytes

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._sequences[ticket.client_id] -= ticket.num_sequences
        self._tokens[ticket.client_id] -= ticket.num_tokens
        self._bytes -= ticket.num_bytes
        for counter in (self._sequences, self._tokens):
            if counter[ticket.client_id] <= 0:
                del counter[ticket.client_id]

    def _check_bytes(self, more: int) -> None:
        held = self._bytes + self._engine.held_prompt_bytes()
        if held + more > self.max_bytes:
            raise ServerBusyError(
                f"requests being prepared or run hold {held} bytes of images; this one would pass the server's "
                f"budget of {self.max_bytes} bytes (--max-preparing-bytes); retry shortly",
                retry_after_s=_RETRY_AFTER_S)
