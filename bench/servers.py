"""The servers under test: how each is started, waited for, and stopped.

Each server runs as its own process group on 127.0.0.1 with its output in a log file; readiness means HTTP 200
from /health or /v1/models while the process is alive.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import Dialect

SERVED_NAME = "bench"

# `python3 -m vlmserve serve ...`: the GPU machine has no console script, only PYTHONPATH.
OURS_COMMAND = ("{python} -m vlmserve serve {model} --host 127.0.0.1 --port {port} --engine {engine} "
                "--served-model-name {name} --dtype bfloat16 --device {device}")


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration of the benchmark."""

    key: str
    label: str
    command: str  # a format string over python, model, port, device, name (and engine for ours)
    dialect: str = Dialect.OPENAI
    request_model: str = SERVED_NAME  # the `model` field requests carry ("{model}" = the checkpoint path)
    extra_args: str = ""
    engine: str = "paged"
    is_ours: bool = False
    workloads: tuple[str, ...] = ("w2", "w1", "w3")

    def argv(self, *, model: str, port: int, device: str) -> list[str]:
        text = self.command.format(python=shlex.quote(sys.executable), model=shlex.quote(model), port=port,
                                   device=device, name=SERVED_NAME, engine=self.engine)
        return shlex.split(f"{text} {self.extra_args}".strip())

    def model_field(self, model: str) -> str:
        return self.request_model.format(model=model)


SERVERS: dict[str, ServerSpec] = {
    spec.key: spec
    for spec in (
        # BENCH_OURS_ARGS: extra flags for our main server (e.g. --compile-decoder once the CUDA check passed)
        ServerSpec("ours", "vlmserve (paged)", OURS_COMMAND, is_ours=True,
                   extra_args=os.environ.get("BENCH_OURS_ARGS", "")),
        ServerSpec("ours-nocache", "vlmserve (paged, prefix cache off)", OURS_COMMAND, is_ours=True,
                   extra_args="--no-enable-prefix-caching --image-cache-bytes 0", workloads=("w3",)),
        ServerSpec("ours-generate", "vlmserve (generate fallback)", OURS_COMMAND, engine="generate", is_ours=True),
        ServerSpec("seed", "seed-style (FastAPI + generate)",
                   "{python} -m bench.seed_server {model} --host 127.0.0.1 --port {port} --device {device} "
                   "--dtype bfloat16 --served-model-name {name}"),
        # --continuous-batching is asked for on purpose: transformers serve falls back to sequential generate
        # for VLMs and logs why, which the run records.
        ServerSpec("tserve", "transformers serve",
                   "{python} -m transformers.cli.transformers serve {model} --host 127.0.0.1 --port {port} "
                   "--device {device} --dtype bfloat16 --continuous-batching --log-level info",
                   dialect=Dialect.TRANSFORMERS_SERVE, request_model="{model}"),
    )
}

GROUPS = {
    "all": ("ours", "ours-nocache", "seed", "tserve"),
    "ours": ("ours", "ours-nocache"),
    "main": ("ours",),
    "baselines": ("seed", "tserve"),
}


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # The multi-GPU kinds require multicast off in every process; harmless elsewhere.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


@dataclass
class RunningServer:
    """A started server process and its log."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    started_at: float = field(default_factory=time.perf_counter)

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-num_chars:]

    def last_log_lines(self, num_lines: int = 3) -> list[str]:
        return [line for line in self.log_tail(4000).splitlines() if line.strip()][-num_lines:]

    def log_lines_matching(self, *needles: str, limit: int = 5) -> list[str]:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [line.strip() for line in lines if any(n in line for n in needles)][:limit]

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ready; raises RuntimeError if the process dies or the timeout passes."""
        deadline = self.started_at + timeout_s
        while time.perf_counter() < deadline:
            if not self.is_alive():
                raise RuntimeError(f"{self.spec.key} exited with code {self.process.returncode} before ready")
            for path in ("/health", "/v1/models"):
                try:
                    with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - self.started_at
                except OSError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.key} not ready after {timeout_s:.0f} s")

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.is_alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the group this run started (start_new_session)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)


def start_server(spec: ServerSpec, *, model: str, port: int, device: str, log_dir: Path) -> RunningServer:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.key}.log"
    argv = spec.argv(model=model, port=port, device=device)
    with log_path.open("wb") as log:
        log.write(("$ " + shlex.join(argv) + "\n").encode())
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                   start_new_session=True)
    return RunningServer(spec=spec, process=process, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
