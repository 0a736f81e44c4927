"""`python -m bench.plain_chain`: what the gateway listener's constant API-management filter
chain costs a request of a routing file without `consumers` or `limits`, in Envoy alone.

Static Envoys (one worker each) answer `/v2/models/iris/infer` with a direct response:
`router_only` has the router alone (the plain listener before the chain was constant),
`plain_chain` has the gateway's filters as a plain file gets them (every one disabled, the
rate filter with its no-op config), and `keys_and_rate` the same chain with the route and
virtual host configs of a file with an API key and a rate (issue 13's benchmark, in Envoy
alone: the key check, the consumer header and a token bucket per consumer and model; the
rate is high enough never to refuse). wrk runs against each, alternating the order round
by round; medians of the rounds and of the per-round p50 deltas and rps ratios against
`router_only`. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
    HttpFilter,
)
from google.protobuf.json_format import MessageToJson

from bench.workdir import scratch_dir
from control_plane.api_filters import FILTERS
from control_plane.config import parse
from control_plane.resources import Resources
from control_plane.translate import LISTENER_NAME, translate
from gateway import static_envoy
from gateway.envoy_proxy import envoy_path
from gateway.processes import free_port

PLAIN = "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:9]}}\n"
KEY = "bench-key-0123456789"
MANAGED = """\
consumers: {keys_file: api-keys.yaml}
models:
  iris:
    versions: {v1: {endpoints: [127.0.0.1:9]}}
    limits: {rate: {per_consumer: 1000000/s, burst: 1000000}}
"""
PATH = "/v2/models/iris/infer"
HEADERS = {"x-api-key": KEY}


def _translated(workdir: Path, text: str) -> Resources:
    (workdir / "api-keys.yaml").write_text(f"alice: {KEY}\n")
    routing = workdir / "routing.yaml"
    routing.write_text(text)
    return translate(parse(text, str(routing)))


def _gateway_chain(resources: Resources) -> list[HttpFilter]:
    """The file's filters, the ECDS ones with the config the control plane serves."""
    hcm = HttpConnectionManager()
    resources.listeners[LISTENER_NAME].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    chain = []
    for f in hcm.http_filters:
        if f.HasField("config_discovery"):
            served = resources.extension_configs[f.name].typed_config
            f = HttpFilter(name=f.name, typed_config=served, disabled=f.disabled)
        chain.append(f)
    assert [f.name for f in chain[:-1]] == [f.name for f in FILTERS]
    return chain


def _route_configs(resources: Resources) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-filter configs of the virtual host holding iris's split route, and the route's."""
    for routes in resources.routes.values():
        for host in routes.virtual_hosts:
            for route in host.routes:
                if route.name == "iris/split":
                    return dict(host.typed_per_filter_config), dict(route.typed_per_filter_config)
    raise LookupError("no iris/split route")


def _start(
    workdir: Path,
    name: str,
    filters: list[HttpFilter],
    configs: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
) -> tuple[subprocess.Popen, int]:
    port, admin = free_port(), free_port()
    host_configs, route_configs = configs
    hcm = static_envoy.answering(name, filters, route_configs, host_configs)
    bootstrap = static_envoy.bootstrap(hcm, port, admin)
    path = workdir / f"{name}.json"
    path.write_text(MessageToJson(bootstrap))
    command = [envoy_path(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"]
    log = (workdir / f"{name}.log").open("w")
    envoy = subprocess.Popen([*command, "-l", "error"], stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", headers=HEADERS)
            urllib.request.urlopen(request, timeout=1).read()
            return envoy, port
        except OSError:
            assert time.monotonic() < deadline and envoy.poll() is None, f"{name} did not start"
            time.sleep(0.1)


def _wrk(port: int, concurrency: int, seconds: float) -> tuple[float, float]:
    """p50 (ms) and requests/s of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "--latency",
            *("-H", f"x-api-key: {KEY}"),
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()
    p50 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return p50, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plain_chain", description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    report: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds}
    with scratch_dir("infergate-bench-chain-") as workdir:
        plain = _gateway_chain(_translated(workdir, PLAIN))
        managed = _translated(workdir, MANAGED)
        variants = {
            "router_only": ([plain[-1]], ({}, {})),
            "plain_chain": (plain, ({}, {})),
            "keys_and_rate": (_gateway_chain(managed), _route_configs(managed)),
        }
        envoys = {name: _start(workdir, name, *variant) for name, variant in variants.items()}
        try:
            for c in (1, 16):
                runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
                for i in range(args.rounds):
                    for name in list(variants)[:: 1 if i % 2 == 0 else -1]:
                        _wrk(envoys[name][1], c, 1.0)  # warm-up
                        runs[name].append(_wrk(envoys[name][1], c, args.seconds))
                base = runs["router_only"]
                report[f"c{c}"] = {
                    name: {
                        "p50_ms": round(statistics.median(r[0] for r in rs), 4),
                        "rps": round(statistics.median(r[1] for r in rs)),
                        "p50_delta_ms": round(
                            statistics.median(b[0] - a[0] for a, b in zip(base, rs, strict=True)), 4
                        ),
                        "rps_ratio": round(
                            statistics.median(b[1] / a[1] for a, b in zip(base, rs, strict=True)), 3
                        ),
                    }
                    for name, rs in runs.items()
                }
        finally:
            for envoy, _ in envoys.values():
                envoy.terminate()
                envoy.wait()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
