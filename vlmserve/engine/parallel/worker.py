"""A tensor-parallel worker (ranks 1..N-1): load this rank's shard, mirror rank 0's engine set-up, then run every
forward rank 0 announces until it says stop.

The set-up must issue the same collectives in the same order as rank 0's `PagedEngineCore`: the KV-cache size
(a memory-profile forward on GPU, then a MIN over ranks) and the CUDA-graph captures (one forward per captured
batch size). Both go through the same functions rank 0 calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from vlmserve.config import Config
from vlmserve.engine.image_cache import ImageEmbeddingCache
from vlmserve.engine.kv_cache import KVCache
from vlmserve.engine.model_runner import ModelRunner
from vlmserve.engine.parallel.group import TensorParallelGroup, destroy_group, init_group
from vlmserve.engine.parallel.step import STOP, StepChannel

logger = logging.getLogger(__name__)


def worker_main(rank: int, init_method: str, config: Config, device_type: str, parent_pid: int) -> None:
    """Entry point of a worker process (forked from the forkserver: `parent_pid` is rank 0, not our parent)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    _exit_with_parent(parent_pid)
    group = init_group(rank, config.engine.tensor_parallel_size, init_method, device_type)
    try:
        runner = _start(group, config)
        serve_forwards(runner, StepChannel(group))
    finally:
        destroy_group()


def _start(group: TensorParallelGroup, config: Config) -> ModelRunner:
    from vlmserve.engine.core import kv_cache_size
    from vlmserve.engine.parallel.shard_loader import load_shard

    error = None
    try:
        adapter = load_shard(config.model, group)
    except Exception as exc:  # reported to rank 0 through the group, so that no rank waits forever
        error = f"{type(exc).__name__}: {exc}"
        logger.exception("loading this rank's shard failed")
    errors = group.gather_errors(error)
    if errors:
        raise SystemExit(1)
    engine = config.engine
    num_blocks, max_model_len = kv_cache_size(adapter, engine)
    cache = KVCache.allocate(adapter.kv_layout, num_blocks, engine.block_size, dtype=adapter.dtype,
                             device=adapter.device)
    return ModelRunner(adapter, cache, ImageEmbeddingCache(0), max_num_seqs=engine.max_num_seqs,
                       max_model_len=max_model_len, enable_cuda_graphs=engine.enable_cuda_graphs,
                       compile_decoder=engine.compile_decoder, computes_logits=False)


def serve_forwards(runner: ModelRunner, channel: StepChannel) -> None:
    """Run rank 0's forwards, in order, until it sends stop."""
    while True:
        plan = channel.receive()
        if plan.kind == STOP:
            return
        runner.run_plan(plan)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose server died (killed, crashed) would wait in a broadcast forever: leave with it."""
    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
