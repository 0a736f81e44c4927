"""Push latency: from a weight edit of the routing file to every simulated Envoy having
ACKed the new routes, with the control plane's CPU time and memory."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from bench.xds_scale.configs import routing_yaml, write_atomically
from bench.xds_scale.fleet import Fleet, scenario, workers_for
from bench.xds_scale.plane import PlaneProcess


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(
    workdir: Path,
    *,
    clients: int,
    models: int,
    delta: bool,
    edits: int,
    workers: int | None = None,
    plane_module: str = "gateway.cli",
    timeout: float = 300.0,
) -> dict[str, Any]:
    """One scenario: start a control plane and the clients, converge, then `edits` edits."""
    name = f"{'delta' if delta else 'sotw'}-{clients}c-{models}m"
    config = workdir / f"{name}.yaml"
    config.write_text(routing_yaml(models))
    with PlaneProcess(config, workdir / f"{name}.plane.log", plane_module) as plane:
        cpu_start = plane.cpu()
        started = time.monotonic()
        with Fleet(
            plane.address,
            clients,
            workers or workers_for(clients),
            delta,
            workdir / f"{name}.workers.log",
            reconnect=True,  # as Envoys do; counted in `stream_restarts`
        ) as fleet:
            version, times = fleet.wait_routes(set(), timeout)
            initial_s = max(times) - started
            connected = {"cpu_s": round(plane.cpu() - cpu_start, 2), **plane.memory()}
            time.sleep(0.5)  # let the last ACKs settle before measuring edits
            known, rows = {version}, []
            cpu0, fleet_cpu0 = plane.cpu(), fleet.cpu()
            for edit in range(1, edits + 1):
                wall = time.time()
                write_atomically(config, routing_yaml(models, edit))
                written = time.monotonic()
                version, times = fleet.wait_routes(known, timeout)
                known.add(version)
                rows.append((wall, [t - written for t in times]))
                time.sleep(0.1)
            cpu1, fleet_cpu1 = plane.cpu(), fleet.cpu()
            memory = plane.memory()
            fleet_rss = fleet.memory()
            restarts = {"count": fleet.reconnects, "last_error": fleet.last_reconnect_error[:200]}
        builds = plane.builds()
    return _summary(name, clients, models, delta, initial_s, connected, rows, builds) | {
        "plane_cpu_s_per_edit": round((cpu1 - cpu0) / edits, 3),
        "plane_cpu_ms_per_pushed_client": round((cpu1 - cpu0) / edits / clients * 1000, 3),
        "plane_cpu_s_total": round(cpu1 - cpu0, 2),
        "plane_memory_mb": memory,
        "clients_cpu_s_per_edit": round((fleet_cpu1 - fleet_cpu0) / edits, 3),
        "clients_rss_mb": round(fleet_rss, 1),
        "stream_restarts": restarts,
    }


def _summary(
    name: str,
    clients: int,
    models: int,
    delta: bool,
    initial_s: float,
    connected: dict[str, float],
    rows: list[tuple[float, list[float]]],
    builds: list[tuple[float, float]],
) -> dict[str, Any]:
    last = [max(lat) for _, lat in rows]
    first = [min(lat) for _, lat in rows]
    per_client = [x for _, lat in rows for x in lat]
    applied, build_ms, fanout = [], [], []
    for wall, lat in rows:  # the first snapshot logged after the write is the edit's
        after = [(at, ms) for at, ms in builds if at >= wall - 0.002]
        if after:
            applied.append(after[0][0] - wall)
            build_ms.append(after[0][1])
            fanout.append(max(lat) - applied[-1])
    print(
        f"  {name}: all ACKed p50 {_ms(statistics.median(last))} ms, "
        f"p99 {_ms(percentile(last, 99))} ms",
        file=sys.stderr,
    )
    return {
        **scenario(name, delta, clients, models),
        "edits": len(rows),
        "initial_converge_s": round(initial_s, 2),
        "after_connect": connected,
        "all_acked_ms": {"p50": _ms(percentile(last, 50)), "p99": _ms(percentile(last, 99))},
        "first_client_ms": {"p50": _ms(percentile(first, 50)), "p99": _ms(percentile(first, 99))},
        "last_client_ms": {"p50": _ms(percentile(last, 50)), "max": _ms(max(last))},
        "per_client_ack_ms": {
            "p50": _ms(percentile(per_client, 50)),
            "p99": _ms(percentile(per_client, 99)),
        },
        "write_to_snapshot_ms": {"p50": _ms(_median(applied)), "n": len(applied)},
        "build_ms": {"p50": round(_median(build_ms), 1)},
        "snapshot_to_all_acked_ms": {"p50": _ms(_median(fanout)), "p99": _ms(_pct(fanout, 99))},
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pct(values: list[float], p: float) -> float:
    return percentile(values, p) if values else float("nan")
