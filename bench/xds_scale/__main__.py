"""`python -m bench.xds_scale`: xDS push latency and snapshot cost at scale; one JSON document
on stdout, progress on stderr. See docs/xds-scale.md."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import emit
from bench.workdir import scratch_dir
from bench.xds_scale import analysis, floor, models, plane, push, storm
from control_plane.xds_server import INITIAL_SYNCS

ROUTE_CLIENTS = 100  # clients for the push-time-by-model-count table
CLIENT_MODELS = 10  # models for the push-time-by-client-count table
STORM_CLIENTS, STORM_MODELS = 1000, 100  # reconnect storm
STORM_BOUNDS = (0, INITIAL_SYNCS)  # initial syncs at once: unbounded (as before), the default


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.xds_scale", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run (small sizes, 3 edits)")
    p.add_argument("--clients", type=_ints, help="client counts (default 100,1000,5000)")
    p.add_argument("--models", type=_ints, help="model counts (default 10,100,1000)")
    p.add_argument("--edits", type=int, help="weight edits per scenario (default 10)")
    p.add_argument("--no-analysis", action="store_true", help="skip the bottleneck analysis")
    p.add_argument("--only", choices=["build", "clients", "models", "storm"], action="append")
    p.add_argument(
        "--plane-source",
        type=Path,
        help="run the control plane from this source tree (e.g. an older commit's `git archive`)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=0.0,
        help="the control plane's endpoint probes, as deployed (1); default 0: off",
    )
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "control_plane")
    return {
        "git": git("rev-parse", "--short", "HEAD") + ("+dirty control_plane" if dirty else ""),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def _guarded(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario; a failure is reported in its place and the others still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (reported in the JSON)
        print(f"  {label} failed: {exc!r}", file=sys.stderr)
        return {"scenario": label, "error": repr(exc)[:500]}


def _push(workdir: Path, clients: int, models: int, delta: bool, edits: int) -> dict[str, Any]:
    """One guarded push scenario, labelled `<mode>-<clients>c-<models>m`."""
    return _guarded(
        f"{'delta' if delta else 'sotw'}-{clients}c-{models}m",
        lambda: push.run(workdir, clients=clients, models=models, delta=delta, edits=edits),
    )


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    clients = args.clients or ([20, 100] if args.quick else [100, 1000, 5000])
    model_counts = args.models or ([10, 100] if args.quick else [10, 100, 1000])
    edits = args.edits or (3 if args.quick else 10)
    report: dict[str, Any] = {
        "quick": args.quick,
        "machine": machine(),
        "plane_source": str(plane.PLANE_SOURCE or "."),
        "health_interval": plane.HEALTH_INTERVAL,
        "load_average_before": os.getloadavg(),
    }

    want = set(args.only or ["build", "clients", "models", "storm"])

    if "build" in want:
        print("snapshot build, in-process", file=sys.stderr)
        report["snapshot_build"] = [
            models.measure(n, repeats=2 if args.quick else (3 if n >= 1000 else 5))
            for n in model_counts
        ]

    if "clients" in want:
        print(f"push by clients ({CLIENT_MODELS} models, {edits} edits)", file=sys.stderr)
        report["push_by_clients"] = [
            _push(workdir, n, CLIENT_MODELS, delta, edits)
            for n in clients
            for delta in (False, True)
        ]
        print("grpc floor (bare grpcio streams, one message each way)", file=sys.stderr)
        report["grpc_floor"] = [
            _guarded(f"floor-{n}", lambda n=n: floor.run(workdir, n, edits)) for n in clients
        ]

    if "models" in want:
        route_clients = min(ROUTE_CLIENTS, max(clients))
        print(f"push by models ({route_clients} SotW clients)", file=sys.stderr)
        report["push_by_models"] = [
            _push(workdir, route_clients, n, False, edits) for n in model_counts
        ]

    if "storm" in want:
        storm_clients = min(STORM_CLIENTS, max(clients))
        print(f"reconnect storm ({storm_clients} clients, {STORM_MODELS} models)", file=sys.stderr)
        report["reconnect_storm"] = [
            _guarded(
                f"storm-{'delta' if delta else 'sotw'}-{bound}",
                lambda delta=delta, bound=bound: storm.run(
                    workdir,
                    clients=storm_clients,
                    models=STORM_MODELS,
                    delta=delta,
                    initial_syncs=bound,
                ),
            )
            for delta in (False, True)
            for bound in STORM_BOUNDS
        ]

    if not args.no_analysis:
        print("bottleneck analysis", file=sys.stderr)
        size = 10 if args.quick else 100
        report["analysis"] = {
            "profile_build_top_own_time": analysis.profile_build(size),
            "per_stream_push_ms": [
                {
                    "models": n,
                    "sotw": analysis.per_stream_push_ms(n),
                    "delta": analysis.per_stream_push_ms(n, delta=True),
                }
                for n in model_counts
            ],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plane_source:
        plane.PLANE_SOURCE = args.plane_source.resolve()
    plane.HEALTH_INTERVAL = args.health_interval
    started = time.monotonic()
    with scratch_dir("infergate-xds-scale-") as workdir:
        report = run(args, workdir)
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["load_average_after"] = os.getloadavg()
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
