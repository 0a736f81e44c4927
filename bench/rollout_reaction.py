"""Reaction time of a rollout: from the moment a canary starts failing to its weight
reaching 0 in Envoy's own config, and the requests the failing canary served meanwhile.

`python -m bench.rollout_reaction [--rates 50,500] [--runs 3] [--interval 5]` runs the
control plane process and one real Envoy (the tests' harness) in front of test upstreams
(`bench.rollout_upstreams`), with open-loop load at each rate. Per run: a rollout with
steps [50, 100] starts with a healthy canary; 1.5 s after Envoy has the 50% split the
canary starts failing 5% of its requests; the clock stops when Envoy's route no longer has
the canary (or, if the failure went unnoticed, when it has only the canary). Prints JSON
with every run and the medians per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.__main__ import machine
from bench.rollout_upstreams import Upstreams
from gateway import observe
from tests.stack import IRIS_BODY, Stack, get_json, routing_yaml

ROLLOUT = """\
    rollout:
      canary: v2
      steps: [50, 100]
      interval: {interval}s
      min_requests: 100
"""


class PacedLoad:
    """Requests at a fixed rate (open loop: each on its own, not waiting for the last)
    from an event loop in a thread; counts answers by status."""

    def __init__(self, port: int, rate: float):
        self.url = f"http://127.0.0.1:{port}/v2/models/iris/infer"
        self.rate = rate
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(self.url, data=IRIS_BODY) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.statuses[status] = self.statuses.get(status, 0) + 1

    async def _run(self) -> None:
        headers = {"content-type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            tasks: set[asyncio.Task] = set()
            start, sent = time.monotonic(), 0
            while not self._stop.is_set():
                sent += 1
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, start + sent / self.rate - time.monotonic()))
            await asyncio.gather(*tasks)

    def __enter__(self) -> PacedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def envoy_split(s: Stack) -> dict[str, int]:
    """The cluster weights of iris's split route in Envoy's own config (its admin port)."""
    return observe.weights(
        observe.route(f"http://127.0.0.1:{s.envoy_admin}", "iris/split")["route"]
    )


def wait_until(condition, timeout: float, what: str, poll: float = 0.01) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)
    return time.monotonic()


def one_run(workdir: Path, rate: float, interval: float) -> dict[str, Any]:
    s = Stack(workdir, workdir, replicas={"v1": 1, "v2": 1})
    ports = {version: p[0] for version, p in s.model_ports.items()}
    with Upstreams(ports) as upstreams:
        try:
            extra = ROLLOUT.format(interval=interval)
            s.write(routing_yaml(s.listen, s.model_ports, {"v1": 100}, extra=extra))
            s.start_control_plane("--health-interval", "0")
            s.start_envoy()
            with PacedLoad(s.listen, rate) as load:
                half = {"iris/v1": 50, "iris/v2": 50}
                wait_until(lambda: envoy_split(s) == half, 30, "the 50% step in Envoy")
                time.sleep(1.5)
                canary = upstreams.behaviour["v2"]
                served_before = canary.served
                failing_since = time.monotonic()
                canary.fail_every = 20
                ended = ({"iris/v1": 100}, {"iris/v2": 100})  # rolled back, or promoted
                out = wait_until(lambda: envoy_split(s) in ended, 60, "the end in Envoy")
                served = canary.served - served_before
            rollouts = get_json(f"http://127.0.0.1:{s.admin}/rollouts")["rollouts"]
            decision = rollouts["iris"]["history"][-1]
            return {
                "rolled_back": envoy_split(s) == {"iris/v1": 100},
                "reaction_s": round(out - failing_since, 3),
                "canary_requests_meanwhile": served,
                "canary_failures_meanwhile": served // 20,
                "decision": decision["kind"],
                "reason": decision["reason"],
                "client_statuses": load.statuses,
            }
        finally:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_reaction")
    parser.add_argument("--rates", default="50,500")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "conditions": {
            **machine(),
            "interval_s": args.interval,
            "steps": [50, 100],
            "min_requests": 100,
            "canary_fault": "5% of requests fail (every 20th), from 1.5 s into step 1",
            "goal_s": args.interval + 1,
        },
        "rates": {},
    }
    for rate in (float(r) for r in args.rates.split(",")):
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="infergate-reaction-") as workdir:
                runs.append(one_run(Path(workdir), rate, args.interval))
        results["rates"][f"{rate:g}"] = {
            "rolled_back": sum(r["rolled_back"] for r in runs),
            "median_reaction_s": statistics.median(r["reaction_s"] for r in runs),
            "median_canary_requests_meanwhile": statistics.median(
                r["canary_requests_meanwhile"] for r in runs
            ),
            "runs": runs,
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
