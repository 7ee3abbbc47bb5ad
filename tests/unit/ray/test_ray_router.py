"""The image-aware router's key and choice, the stats board and the Ray config, without a Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

pytest.importorskip("ray.serve.request_router")

from vlmserve.config import ConfigError, RayConfig
from vlmserve.ray.client import sum_stats
from vlmserve.ray.router import AffinityTable, choose, request_block_hashes
from vlmserve.ray.stats_board import StatsBoard
from vlmserve.types import EngineStats, GenerationRequest, ImageSpan, PreparedPrompt, SamplingParams


def request(tokens: list[int], images: tuple[str, ...] = (), spans: tuple[ImageSpan, ...] = (),
            salt: str | None = None) -> GenerationRequest:
    prompt = PreparedPrompt(token_ids=tokens, image_hashes=images, image_spans=spans)
    return GenerationRequest("r", prompt, SamplingParams(), cache_salt=salt)


# 3 blocks of 4 tokens; image 0 covers tokens 2..5 (blocks 0 and 1), image 1 covers 9..10 (block 2)
TOKENS = list(range(100, 112))
SPANS = (ImageSpan(2, 6, 0), ImageSpan(9, 11, 1))


def test_the_key_changes_from_the_block_holding_a_changed_image_on() -> None:
    base = request_block_hashes(request(TOKENS, ("cat", "dog"), SPANS), 4)
    second_changed = request_block_hashes(request(TOKENS, ("cat", "fox"), SPANS), 4)
    first_changed = request_block_hashes(request(TOKENS, ("cow", "dog"), SPANS), 4)
    assert len(base) == 3
    assert second_changed[:2] == base[:2] and second_changed[2] != base[2]
    assert all(a != b for a, b in zip(first_changed, base, strict=True))


def test_the_key_covers_full_blocks_only_and_is_salted() -> None:
    assert len(request_block_hashes(request(TOKENS[:7]), 4)) == 1
    assert request_block_hashes(request(TOKENS, salt="key-a"), 4) != request_block_hashes(request(TOKENS), 4)


@pytest.mark.parametrize("salt", [None, "key-a"])
def test_the_key_is_the_engines_own_block_hash_chain(salt: str | None) -> None:
    from vlmserve.engine.kv_cache_manager import KVCacheManager
    from vlmserve.engine.request import Sequence

    routed = request(TOKENS, ("cat", "dog"), SPANS, salt=salt)
    sequence = Sequence(request=routed, sampling=None)  # type: ignore[arg-type]  # never sampled here
    manager = KVCacheManager(8, block_size=4, enable_prefix_caching=True)
    manager.lookup(sequence)
    assert request_block_hashes(routed, 4) == sequence.block_hashes


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId


A, B = FakeReplica(FakeId("a")), FakeReplica(FakeId("b"))


def test_the_replica_holding_the_longest_prefix_comes_first() -> None:
    table = AffinityTable()
    hashes = request_block_hashes(request(TOKENS, ("cat", "dog"), SPANS), 4)
    table.record(hashes[:1], "a")
    table.record(hashes, "b")
    assert choose([A, B], hashes, table, {"a": 0, "b": 0}, imbalance_threshold=4) == [[B], [A]]
    other = request_block_hashes(request(TOKENS, ("cow", "dog"), SPANS), 4)
    assert choose([A, B], other, table, {}, imbalance_threshold=4) == [[A, B]]  # no affinity: Serve balances


def test_affinity_gives_way_to_an_imbalanced_load_and_to_a_dead_replica() -> None:
    table = AffinityTable()
    hashes = request_block_hashes(request(TOKENS), 4)
    table.record(hashes, "b")
    assert choose([A, B], hashes, table, {"a": 0, "b": 4}, imbalance_threshold=4) == [[B], [A]]
    assert choose([A, B], hashes, table, {"a": 0, "b": 5}, imbalance_threshold=4) == [[A, B]]
    assert choose([A], hashes, table, {}, imbalance_threshold=4) == [[A]]
    table.forget("b")
    assert table.longest_match(hashes, {"a", "b"}) == (None, 0)


def test_the_table_is_bounded() -> None:
    table = AffinityTable(max_entries=2)
    table.record([b"1", b"2", b"3"], "a")
    assert table.longest_match([b"1"], {"a"}) == (None, 0) and table.longest_match([b"3"], {"a"}) == ("a", 1)


def test_stats_add_up_across_replicas_and_stale_replicas_drop_out(monkeypatch: pytest.MonkeyPatch) -> None:
    one = EngineStats(num_running=2, num_finished=5, prefix_cache_hits=7, engine="paged")
    total = sum_stats([one, replace(one, num_running=1)])
    assert (total.num_running, total.num_finished, total.prefix_cache_hits, total.engine) == (3, 10, 14, "paged")
    board = StatsBoard()
    clock = [100.0]
    monkeypatch.setattr("vlmserve.ray.stats_board.time.monotonic", lambda: clock[0])
    board.report("a", one)
    clock[0] += 10
    board.report("b", one)
    assert set(board.snapshot()) == {"b"}


def test_ray_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="--replicas"):
        RayConfig(replicas=0)
    with pytest.raises(ConfigError, match="between"):
        RayConfig(replicas=5, max_replicas=4)


def test_the_serve_config_builder_takes_vlmserve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmserve.ray.app as ray_app

    monkeypatch.setattr(ray_app, "build_application", lambda config: config)
    config = ray_app.build({"model": "some/model", "replicas": 3, "max_num_seqs": 16, "router": "power-of-two",
                            "trust_remote_code": True, "api_key": ["k1", "k2"]})
    assert config.model.model == "some/model" and config.model.trust_remote_code
    assert (config.ray.replicas, config.ray.router, config.engine.max_num_seqs) == (3, "power-of-two", 16)
    assert config.server.api_key == ("k1", "k2")
