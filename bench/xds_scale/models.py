"""Snapshot cost per model count, in-process: parse, translate, serialize; and sizes."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.xds_scale.configs import routing_yaml
from control_plane.config import parse
from control_plane.snapshot import PUSH_ORDER, ROUTE, SHORT_NAMES, Snapshot, build_snapshot
from control_plane.translate import translate
from control_plane.wire import encode_delta_response, encode_sotw_body

EPOCH = "bench"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def sizes(snapshot: Snapshot) -> dict[str, Any]:
    """Bytes of the serialized resources, of one full SotW and Delta push, and of the RDS
    response that every client receives on a weight edit."""
    per_type = {
        SHORT_NAMES[t]: sum(len(b) for b in snapshot.types[t].resources.values())
        for t in PUSH_ORDER
        if t in snapshot.types
    }
    sotw = {
        t: encode_sotw_body(ts.version, list(ts.resources.values()), t)
        for t, ts in snapshot.types.items()
    }
    delta = {
        t: encode_delta_response(
            ts.version, {n: (ts.versions[n], b) for n, b in ts.resources.items()}, [], t, "1"
        )
        for t, ts in snapshot.types.items()
    }
    return {
        "snapshot_bytes": sum(per_type.values()),
        "snapshot_bytes_by_type": per_type,
        "full_sotw_push_bytes": sum(len(b) for b in sotw.values()),
        "full_delta_push_bytes": sum(len(b) for b in delta.values()),
        "rds_response_bytes": len(sotw[ROUTE]),
        "resources": {SHORT_NAMES[t]: len(ts.resources) for t, ts in snapshot.types.items()},
    }


def measure(models: int, repeats: int) -> dict[str, Any]:
    """Median over `repeats` of each stage of turning the routing file into a snapshot after
    a one-model edit (as a save is: unchanged models are reused), and the first parse of
    the file (nothing to reuse)."""
    cold_ms, _ = _timed(lambda: parse(routing_yaml(models)))
    stages: dict[str, list[float]] = {"parse_ms": [], "translate_ms": [], "serialize_ms": []}
    snapshot = None
    for i in range(repeats):
        text = routing_yaml(models, edit=i + 1)
        parse_ms, config = _timed(lambda t=text: parse(t))
        translate_ms, resources = _timed(lambda c=config: translate(c))
        serialize_ms, snapshot = _timed(lambda r=resources: build_snapshot(r, EPOCH))
        stages["parse_ms"].append(parse_ms)
        stages["translate_ms"].append(translate_ms)
        stages["serialize_ms"].append(serialize_ms)
    assert snapshot is not None
    totals = [sum(s) for s in zip(*stages.values(), strict=True)]
    result: dict[str, Any] = {"models": models, "versions": 3 * models, "repeats": repeats}
    result["first_parse_ms"] = round(cold_ms, 1)
    result |= {k: round(statistics.median(v), 1) for k, v in stages.items()}
    result["total_ms"] = round(statistics.median(totals), 1)
    result["build_snapshot_ms"] = round(
        statistics.median(
            t + s for t, s in zip(stages["translate_ms"], stages["serialize_ms"], strict=True)
        ),
        1,
    )
    result |= sizes(snapshot)
    print(f"  {models} models: {result['total_ms']} ms", file=sys.stderr)
    return result
