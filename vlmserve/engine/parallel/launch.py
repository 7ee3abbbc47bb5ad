"""Start a tensor-parallel group from the server process (rank 0) and stop it again.

`start` refuses an unsupported model before any worker exists (config.json is enough to tell), spawns ranks
1..N-1 (`worker.worker_main`), joins the group as rank 0 and loads rank 0's shard. Every rank reports whether its
shard loaded before anyone goes on, so a failure anywhere fails the start everywhere instead of hanging.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
from multiprocessing.process import BaseProcess

import torch

from vlmserve.config import Config
from vlmserve.engine.parallel.group import TensorParallelGroup, destroy_group, free_init_method, init_group
from vlmserve.engine.parallel.sharding import FLAG
from vlmserve.engine.parallel.step import StepChannel
from vlmserve.engine.parallel.worker import worker_main
from vlmserve.errors import TensorParallelError
from vlmserve.models.base import ModelAdapter

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0


class TensorParallelWorkers:
    """Rank 0's handle on the worker processes."""

    def __init__(self, group: TensorParallelGroup, processes: list[BaseProcess]) -> None:
        self.group = group
        self.processes = processes

    def stop(self) -> None:
        """Tell the workers to leave (after the engine stopped stepping), then reap them."""
        if all(p.is_alive() for p in self.processes):
            # NOTE: a worker stuck in a mismatched collective (a step that failed on one rank only) never takes
            # the stop; the thread then stays blocked and the worker is terminated below.
            sender = threading.Thread(target=StepChannel(self.group).send_stop, daemon=True)
            sender.start()
            sender.join(_STOP_TIMEOUT_S)
        for process in self.processes:
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                logger.warning("tensor-parallel worker %s did not stop; terminating it", process.name)
                process.terminate()
                process.join()
        destroy_group()


def start(config: Config) -> tuple[ModelAdapter, TensorParallelWorkers]:
    """Rank 0's adapter (its shard) and the started workers, for `--tensor-parallel-size N` > 1."""
    from vlmserve.engine.parallel.shard_loader import check_supported, load_shard
    from vlmserve.models.loader import resolve_device, resolve_model_path

    size = config.engine.tensor_parallel_size
    device_type = resolve_device(config.model.device)
    _check_devices(device_type, size)
    path = resolve_model_path(config.model.model, revision=config.model.revision)  # downloaded once, here
    check_supported(path, size, trust_remote_code=config.model.trust_remote_code)
    worker_config = dataclasses.replace(config, model=dataclasses.replace(config.model, model=str(path)))
    init_method = free_init_method()
    # NOTE: forkserver, not fork (rank 0 may already run threads, and CUDA cannot be forked) and not plain spawn:
    # the server process imports torch and this package once, and every later group (a restart, each test)
    # forks its workers from it instead of importing them again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vlmserve.engine.parallel.worker", "vlmserve.engine.parallel.shard_loader"])
    processes: list[BaseProcess] = [
        context.Process(target=worker_main, name=f"vlmserve-tp-rank{rank}", daemon=True,
                        args=(rank, init_method, worker_config, device_type, os.getpid()))
        for rank in range(1, size)]
    for process in processes:
        process.start()
    group = init_group(0, size, init_method, device_type)
    workers = TensorParallelWorkers(group, processes)
    error, adapter = None, None
    try:
        adapter = load_shard(worker_config.model, group)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        failure: Exception = exc
    errors = group.gather_errors(error)
    if errors or adapter is None:
        for process in processes:
            process.join(_STOP_TIMEOUT_S)
        destroy_group()
        if error is not None and isinstance(failure, TensorParallelError):
            raise failure
        raise TensorParallelError(f"{FLAG} {size}: loading the shards failed: {'; '.join(errors)}")
    logger.info("tensor parallel: %d ranks on %s, rank 0 holds %s KV heads of each layer", size, device_type,
                adapter.kv_layout.num_kv_heads)
    return adapter, workers


def _check_devices(device_type: str, size: int) -> None:
    if device_type == "mps":
        raise TensorParallelError(f"{FLAG} > 1 runs on CUDA (NCCL) or CPU (gloo), not on mps")
    if device_type == "cuda" and torch.cuda.device_count() < size:
        raise TensorParallelError(f"{FLAG} {size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
