"""Reconnect storm: the control plane is killed and restarted while `clients` simulated
Envoys are connected; they all reconnect at once. Measures the time until every client
has ACKed the new control plane's routes, and the new process's peak memory, with and
without the bound on concurrent initial syncs (xds_server.INITIAL_SYNCS)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from bench.xds_scale.configs import routing_yaml
from bench.xds_scale.fleet import Fleet, scenario, workers_for
from bench.xds_scale.plane import PlaneProcess


def run(
    workdir: Path,
    *,
    clients: int,
    models: int,
    delta: bool,
    initial_syncs: int,
    timeout: float = 300.0,
) -> dict[str, Any]:
    name = f"storm-{'delta' if delta else 'sotw'}-{clients}c-{models}m-cap{initial_syncs}"
    config = workdir / f"{name}.yaml"
    config.write_text(routing_yaml(models))
    log = workdir / f"{name}.plane.log"
    with PlaneProcess(config, log, initial_syncs=initial_syncs) as plane:
        workers = workers_for(clients)
        with Fleet(
            plane.address, clients, workers, delta, workdir / f"{name}.w.log", reconnect=True
        ) as fleet:
            version, _ = fleet.wait_routes(set(), timeout)
            plane.kill()
            killed = time.monotonic()
            plane.start()  # same ports; a new epoch, so every client gets everything anew
            ready = time.monotonic()
            cpu0 = plane.cpu()
            _, times = fleet.wait_routes({version}, timeout)
            cpu = plane.cpu() - cpu0
            memory = plane.memory()
    done = max(times)
    print(
        f"  {name}: all clients current {done - ready:.2f} s after the restart was ready, "
        f"peak RSS {memory['peak_rss_mb']} MB",
        file=sys.stderr,
    )
    return {
        **scenario(name, delta, clients, models),
        "initial_syncs": initial_syncs or "unbounded",
        "kill_to_all_current_s": round(done - killed, 2),
        "ready_to_all_current_s": round(done - ready, 2),
        "ready_to_client_current_s": {
            "p50": round(percentile([t - ready for t in times], 50), 2),
            "p99": round(percentile([t - ready for t in times], 99), 2),
        },
        "plane_cpu_s": round(cpu, 2),
        "plane_cpu_ms_per_client": round(cpu / clients * 1000, 2),
        "plane_memory_mb": memory,
    }
