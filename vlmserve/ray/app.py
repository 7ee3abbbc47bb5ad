"""The Ray Serve application: N `EngineReplica`s behind one ingress running vlmserve's own FastAPI app.

Start it with `vlmserve serve MODEL --ray --replicas N` (this module's `run`), or with Ray Serve's CLI and a
config file naming `vlmserve.ray.app:build` (see README, "Scale out with Ray Serve").
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from vlmserve.config import Config, RayConfig
from vlmserve.serve import PromptKit, build_frontend, log_playground_link

logger = logging.getLogger("vlmserve.ray")

APP_NAME = "vlmserve"
ENGINE_DEPLOYMENT = "EngineReplica"


class Ingress:
    """The HTTP front: built at replica start from a `PromptKit` the engine replicas hand over."""

    async def __init__(self, engine: Any, config: Config, app_name: str) -> None:  # type: ignore[misc]
        # NOTE: Ray Serve awaits async constructors, so the ingress can ask a replica for the prompt kit.
        from vlmserve.ray.client import RayEngineClient
        from vlmserve.ray.stats_board import get_or_create_board

        self._config = config
        self._kit: PromptKit = await engine.prompt_kit.remote()
        per_replica = await engine.max_sequences.remote()
        self._client = RayEngineClient(engine, get_or_create_board(app_name), max_model_len=self._kit.max_model_len,
                                       max_sequences_per_replica=per_replica)
        self._client.start()

    def __serve_build_asgi_app__(self) -> Any:
        return build_frontend(self._client, self._kit, self._config)


def build_application(config: Config, *, app_name: str = APP_NAME) -> Any:
    """The bound Ray Serve application for `config` (replicas, autoscaling and router from `config.ray`)."""
    from ray import serve

    from vlmserve.ray.replica import EngineReplica

    scale = config.ray
    engine = serve.deployment(name=ENGINE_DEPLOYMENT)(EngineReplica).options(
        **_replica_count(scale),
        max_ongoing_requests=config.engine.max_num_seqs + config.engine.max_waiting_requests,
        ray_actor_options={"num_gpus": _gpus_per_replica(config), "num_cpus": scale.num_cpus_per_replica},
        health_check_period_s=2, health_check_timeout_s=30,
        **_router(config),
    ).bind(config, app_name)
    ingress = serve.deployment(name="Ingress")(serve.ingress()(Ingress)).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(engine, config, app_name)
    return ingress


def _router(config: Config) -> dict[str, Any]:
    from ray.serve.config import RequestRouterConfig

    if config.ray.router == "power-of-two":
        return {}  # Ray Serve's default router
    return {"request_router_config": RequestRouterConfig(
        request_router_class="vlmserve.ray.router:ImageAwarePrefixRouter",  # type: ignore[arg-type]
        request_router_kwargs={"block_size": config.engine.block_size,
                               "imbalance_threshold": config.ray.affinity_imbalance_threshold})}


def _gpus_per_replica(config: Config) -> float:
    if config.ray.num_gpus_per_replica is not None:
        return config.ray.num_gpus_per_replica
    from vlmserve.models.loader import resolve_device

    # a replica with --tensor-parallel-size N is a whole TP group: its N ranks run in the replica's actor (rank 0)
    # and N - 1 worker processes it starts, on the N GPUs Ray gives the actor (CUDA_VISIBLE_DEVICES)
    return float(config.engine.tensor_parallel_size) if resolve_device(config.model.device) == "cuda" else 0.0


def _replica_count(scale: RayConfig) -> dict[str, Any]:
    if scale.max_replicas is None:
        return {"num_replicas": scale.replicas}
    return {"autoscaling_config": {
        "min_replicas": scale.min_replicas, "initial_replicas": scale.replicas, "max_replicas": scale.max_replicas,
        "target_ongoing_requests": scale.target_ongoing_requests}}


def build(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` config files: `args` are `vlmserve serve` flags
    (e.g. `{"model": "Qwen/Qwen2-VL-2B-Instruct", "replicas": 2}`)."""
    from vlmserve.cli import build_parser, config_from_args

    argv = ["serve"]
    for key, value in args.items():
        if key == "model":
            argv.insert(1, str(value))
        elif value is True:
            argv.append("--" + key.replace("_", "-"))
        elif value not in (False, None):
            argv += ["--" + key.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    return build_application(config_from_args(build_parser().parse_args(argv)))


def run(config: Config) -> int:
    """`vlmserve serve --ray`: start (or join) a Ray cluster, deploy, serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    scale = config.ray
    if scale.ray_address:
        ray.init(address=scale.ray_address, namespace="vlmserve", ignore_reinit_error=True)
    else:
        ray.init(num_cpus=scale.ray_num_cpus, namespace="vlmserve", ignore_reinit_error=True)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/")
    logger.info("serving on http://%s:%d with %s engine replicas (Ray Serve)", config.server.host,
                config.server.port, scale.replicas)
    log_playground_link(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown()
    return 0


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the application and its stats board."""
    import contextlib

    import ray
    from ray import serve

    from vlmserve.ray.stats_board import board_name

    serve.delete(app_name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(board_name(app_name), namespace="vlmserve"))
