"""The whole benchmark in one process tree: model, ceilings, every server in turn, report.

On the GPU machine (see bench/README.md; bench/run_device.sh installs the carried wheels first):

    python3 -m bench.run_all --out "$OUT" --only baselines --preset preliminary
    python3 -m bench.run_all --out "$OUT" --only ours --preset full

On this CPU machine (tiny layers, full vocabulary; the harness end to end):

    python3 -m bench.run_all --out /tmp/bench-out --device cpu --scale tiny --preset smoke --only seed

Every phase has a time cap and the whole run a budget (--budget-s): a phase that would not fit is skipped and
says so, so the command always ends with results.json, RESULTS.md and plot.png written.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LoadGenerator
from bench.report import write_report
from bench.servers import GROUPS, SERVERS, RunningServer, ServerSpec, server_env, start_server
from bench.workloads import (
    RequestOptions,
    data_uri,
    image_message,
    noise_image_png,
    prompt_text,
    request_body,
)


@dataclass(frozen=True)
class Plan:
    """Request counts and time caps of one preset (counts per concurrency for W1)."""

    w2_requests: int
    w1: dict[int, int]
    w3_conversations: int
    phase_cap_s: float
    w1_c64_cap_s: float
    num_warmup: int = 2
    w3_max_tokens: int = 64
    server_ready_timeout_s: float = 300.0
    drain_s: float = 8.0
    # Baselines serve one request at a time: beyond c=1 a longer run only queues more, so their c>1 phases
    # stop here (reported as truncated; their throughput is already their c=1 throughput).
    serial_cap_s: float = 45.0
    notes: list[str] = field(default_factory=list)


PRESETS = {
    # Baselines serve one request at a time (~4 s per 128-token request at 7B): few requests, capped phases.
    "preliminary": Plan(w2_requests=3, w1={1: 4, 8: 8}, w3_conversations=1, phase_cap_s=50.0, w1_c64_cap_s=50.0,
                        num_warmup=1),
    # >= 10x the concurrency at every level; serial baselines hit the caps (reported as truncated).
    "full": Plan(w2_requests=10, w1={1: 10, 8: 80, 64: 640}, w3_conversations=2, phase_cap_s=60.0,
                 w1_c64_cap_s=100.0),
    # Everything in one ~9-minute GPU call: ours at full counts, both baselines with short caps (they serve one
    # request at a time, so a few requests already give their throughput and latency).
    "onecall": Plan(w2_requests=8, w1={1: 8, 8: 64, 64: 640}, w3_conversations=2, phase_cap_s=20.0,
                    w1_c64_cap_s=45.0, num_warmup=1, serial_cap_s=15.0, drain_s=4.0),
    # The round's final call: our server without the c=1 W1 phase (W2 is the same requests at c=1); the
    # baselines run apart (preset probe) since they serve one request at a time.
    "final": Plan(w2_requests=8, w1={8: 64, 64: 640}, w3_conversations=2, phase_cap_s=20.0, w1_c64_cap_s=35.0,
                  num_warmup=1, drain_s=3.0),
    # A quick look at one server's latency (W2 and W1 at c=1), e.g. a baseline beside an in-process diagnosis.
    "probe": Plan(w2_requests=3, w1={1: 2}, w3_conversations=0, phase_cap_s=40.0, w1_c64_cap_s=40.0, num_warmup=1,
                  drain_s=2.0),
    # Tensor parallelism (issue 18, bench/tp_call.sh): W2 (TPOT at c=1) and W1 at c=64 only, one server at a time.
    "tp": Plan(w2_requests=8, w1={64: 640}, w3_conversations=0, phase_cap_s=20.0, w1_c64_cap_s=35.0, num_warmup=1,
               drain_s=3.0),
    # a 72B-architecture model: W2 only (its TPOT against the bandwidth floor)
    "tp_w2": Plan(w2_requests=6, w1={}, w3_conversations=0, phase_cap_s=40.0, w1_c64_cap_s=40.0, num_warmup=1,
                  drain_s=3.0, server_ready_timeout_s=420.0),
    # CPU harness check with a tiny-layer model.
    "smoke": Plan(w2_requests=2, w1={1: 2, 2: 4}, w3_conversations=1, phase_cap_s=120.0, w1_c64_cap_s=120.0,
                  num_warmup=1, w3_max_tokens=8, server_ready_timeout_s=240.0),
}


class Budget:
    """Wall-clock budget of the whole run; phases get min(their cap, what is left minus a reserve)."""

    def __init__(self, total_s: float, reserve_s: float = 25.0) -> None:
        self.deadline = time.perf_counter() + total_s
        self.reserve_s = reserve_s

    def left(self) -> float:
        return self.deadline - time.perf_counter() - self.reserve_s

    def cap(self, wanted_s: float) -> float:
        return max(0.0, min(wanted_s, self.left()))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_json_subprocess(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a helper module in its own process (keeps the orchestrator CUDA-free); its last stdout line is JSON."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=server_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_model(model: str, model_dir: Path, scale: str, device: str, timeout_s: float) -> dict[str, Any]:
    meta_path = model_dir / "bench_meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("model"), meta.get("scale")) == (model, scale):
            log(f"reusing model at {model_dir}")
            return meta
    log(f"building {scale} {model} checkpoint at {model_dir}")
    argv = [sys.executable, "-m", "bench.models", model, str(model_dir), "--scale", scale, "--device", device]
    return run_json_subprocess(argv, timeout_s)


class Inputs:
    """Request messages shared by all servers (same seeds), built once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[int, int], list[list[dict[str, Any]]]] = {}

    def single_image(self, num_requests: int, seed: int) -> list[list[dict[str, Any]]]:
        key = (num_requests, seed)
        if key not in self._cache:
            self._cache[key] = [
                [image_message(data_uri(noise_image_png(seed * 1_000_003 + i)),
                               prompt_text(seed * 1_000_003 + i, 100, self.tokenizer))]
                for i in range(num_requests)
            ]
        return self._cache[key]


async def run_phases(server: RunningServer, plan: Plan, inputs: Inputs, budget: Budget, model: str,
                     max_tokens: int) -> dict[str, Any]:
    spec = server.spec
    options = RequestOptions(model=spec.model_field(model), max_tokens=max_tokens, dialect=spec.dialect)
    runs: dict[str, Any] = {}
    async with LoadGenerator(server.base_url) as generator:
        warm = [request_body(m, RequestOptions(options.model, 16, options.dialect))
                for m in inputs.single_image(plan.num_warmup, seed=999)]
        if warm:
            runs["warmup"] = await generator.closed_loop(warm, concurrency=len(warm), max_duration_s=budget.cap(120))
        phases: list[tuple[str, int, int, float]] = []
        if "w2" in spec.workloads:
            phases.append(("w2", 1, plan.w2_requests, plan.phase_cap_s))
        if "w1" in spec.workloads:
            for c, n in sorted(plan.w1.items()):
                cap_s = plan.w1_c64_cap_s if c >= 64 else plan.phase_cap_s
                phases.append((f"w1_c{c}", c, n, cap_s if spec.is_ours or c == 1 else min(cap_s, plan.serial_cap_s)))
        for seed, (name, concurrency, num_requests, cap_s) in enumerate(phases, start=1):
            cap = budget.cap(cap_s)
            if cap < 5 or not server.is_alive():
                runs[name] = {"skipped": "run budget spent" if cap < 5 else "server died"}
                continue
            bodies = [request_body(m, options) for m in inputs.single_image(num_requests, seed)]
            log(f"{spec.key} {name}: {num_requests} requests at concurrency {concurrency}, cap {cap:.0f} s")
            runs[name] = await generator.closed_loop(bodies, concurrency=concurrency, max_duration_s=cap)
            log(f"{spec.key} {name}: {runs[name]['completed']} done, {runs[name]['output_throughput']:.1f} tok/s")
            if runs[name]["is_truncated"]:
                # A server that does not abort on disconnect (the seed) may still be generating for a cancelled
                # request: let it finish before the next phase measures.
                await asyncio.sleep(budget.cap(plan.drain_s))
        if "w3" in spec.workloads and plan.w3_conversations:
            cap = budget.cap(plan.phase_cap_s)
            w3_options = RequestOptions(options.model, plan.w3_max_tokens, options.dialect)
            if cap < 5 or not server.is_alive():
                runs["w3"] = {"skipped": "run budget spent" if cap < 5 else "server died"}
            else:
                log(f"{spec.key} w3: {plan.w3_conversations} conversation(s) x 5 turns, cap {cap:.0f} s")
                runs["w3"] = await generator.conversations(num_conversations=plan.w3_conversations, num_turns=5,
                                                           options=w3_options, seed=77, max_duration_s=cap)
    return runs


def run_server(spec: ServerSpec, index: int, args: argparse.Namespace, plan: Plan, inputs: Inputs,
               budget: Budget) -> dict[str, Any]:
    entry: dict[str, Any] = {"label": spec.label, "command": " ".join(spec.argv(
        model=str(args.model_dir), port=8100 + index, device=args.device))}
    if budget.left() < 30:
        entry["error"] = "skipped: run budget spent before this server could start"
        return entry
    server = start_server(spec, model=str(args.model_dir), port=8100 + index, device=args.device,
                          log_dir=args.log_dir)
    try:
        entry["ready_s"] = round(server.wait_ready(min(plan.server_ready_timeout_s, budget.left() - 10)), 1)
        log(f"{spec.key} ready after {entry['ready_s']} s")
        entry["runs"] = asyncio.run(run_phases(server, plan, inputs, budget, str(args.model_dir), args.max_tokens))
    except Exception as exc:  # a server that cannot start or serve is a result too
        entry["error"] = f"{type(exc).__name__}: {exc}"
        if not server.is_alive():
            entry["error"] += " | " + " / ".join(server.last_log_lines())
        log(f"{spec.key} failed: {entry['error']}")
    finally:
        entry["is_alive_at_end"] = server.is_alive()
        server.stop()
        entry["notes"] = server.log_lines_matching("does not support continuous batching", "Falling back",
                                                   "Error", "error", "Traceback")
        entry["log_tail"] = server.log_tail()
    return entry


def _load_tokenizer(model: str, model_dir: Path) -> Any:
    if model == "glm-4v-9b":
        from vlmserve.models.glm4v_9b.tokenizer import load_tokenizer

        return load_tokenizer(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=["qwen2.5-vl-7b", "qwen2.5-vl-72b", "glm-4v-9b"], default="qwen2.5-vl-7b",
                        help="glm-4v-9b: vlmserve only (its published checkpoint needs remote code elsewhere)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default /tmp/bench-<model>")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="all",
                        help=f"a group ({', '.join(GROUPS)}) or comma-separated servers ({', '.join(SERVERS)})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--reserve-s", type=float, default=25.0, help="kept back from the budget for the report")
    parser.add_argument("--skip-hw", action="store_true", help="do not measure the card's ceilings again")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/bench-logs"))
    args = parser.parse_args(argv)
    keys = GROUPS.get(args.only) or tuple(k.strip() for k in args.only.split(","))
    unknown = [k for k in keys if k not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}")
    args.server_keys = keys
    args.model_dir = args.model_dir or Path(f"/tmp/bench-{args.model}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = Budget(args.budget_s, reserve_s=args.reserve_s)
    plan = PRESETS[args.preset]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               "preset": args.preset, "plan": plan.__dict__, "max_tokens": args.max_tokens,
                               "servers": {}}
    try:
        results["info"] = {"skipped": "--skip-hw"} if args.skip_hw else \
            run_json_subprocess([sys.executable, "-m", "bench.hw"], timeout_s=120)
        log(f"device: {json.dumps(results['info'])}")
        results["model"] = ensure_model(args.model, args.model_dir, args.scale, args.device,
                                        timeout_s=max(60, budget.left()))
        inputs = Inputs(_load_tokenizer(args.model, args.model_dir))
        for index, key in enumerate(args.server_keys):
            results["servers"][key] = run_server(SERVERS[key], index, args, plan, inputs, budget)
            write_report(results, args.out)  # partial results survive a later crash or kill
    except Exception as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
        log(f"run failed: {results['error']}")
    finally:
        results["elapsed_s"] = round(args.budget_s - budget.left() - budget.reserve_s, 1)
        write_report(results, args.out)
        with (args.out / "logs.txt").open("w", encoding="utf-8") as handle:
            for key, entry in results["servers"].items():
                handle.write(f"===== {key}: {entry.get('command', '')}\n{entry.get('log_tail', '')}\n")
        log(f"wrote {args.out}/results.json, RESULTS.md, plot.png, logs.txt")


if __name__ == "__main__":
    main()
