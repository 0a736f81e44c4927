"""Per-model route updates (scoped routes): what a one-model weight edit costs, by model
count, side by side with the previous design (one route configuration for all models).

- `bytes`: in-process, the responses a converged stream (SotW and Delta) writes for the
  edit, against the RDS response of the whole route configuration (what every Envoy got
  before: all models' routes in one resource);
- `push` (unless `--bytes-only`): the control plane in its own process, `--clients`
  simulated Envoys per mode, `--edits` edits; from the file rename to the last client's
  RDS ACK (see push.py).

    python -m bench.xds_scale.route_split --models 10,100,1000 --clients 100 --edits 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.workdir import scratch_dir
from bench.xds_scale import push
from bench.xds_scale.analysis import _converged
from bench.xds_scale.configs import routing_yaml
from control_plane.callbacks import NodeInfo
from control_plane.config import parse
from control_plane.nodes import NodeRegistry
from control_plane.snapshot import ROUTE, SHORT_NAMES, build_snapshot
from control_plane.streams import DeltaStream, DesiredCache, SotwStream
from control_plane.translate import translate
from control_plane.wire import encode_sotw_body


def edit_bytes(models: int) -> dict[str, Any]:
    """Bytes a converged stream is sent for a one-model weight edit, per mode and type."""
    first = build_snapshot(translate(parse(routing_yaml(models))), "e")
    started = time.perf_counter()
    second = build_snapshot(translate(parse(routing_yaml(models, 1))), "e")
    build_ms = (time.perf_counter() - started) * 1000
    routes = second.types[ROUTE].resources
    whole = encode_sotw_body(second.types[ROUTE].version, list(routes.values()), ROUTE)
    out: dict[str, Any] = {
        "models": models,
        "whole_rds_response_bytes": len(whole),
        "route_configurations": len(routes),
        "parse_and_build_ms": round(build_ms, 1),
    }
    for cls in (SotwStream, DeltaStream):
        stream = cls(NodeInfo("n"), NodeRegistry(), time.monotonic, DesiredCache())
        stream.open()
        stream.target = first
        _converged(stream, cls is DeltaStream)
        stream.target = second
        sent = stream.responses().responses
        types = [SHORT_NAMES[t] for t, s in stream.types.items() if s.pending]
        out[f"{cls.mode}_edit_bytes"] = sum(len(r) for r in sent)
        out[f"{cls.mode}_edit_types"] = types
    out["ratio_whole_to_sotw"] = round(len(whole) / out["sotw_edit_bytes"], 1)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_ints, default=[10, 100, 1000, 5000])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--edits", type=int, default=5)
    p.add_argument("--bytes-only", action="store_true")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"bytes": [edit_bytes(n) for n in args.models], "push": []}
    if not args.bytes_only:
        with scratch_dir("route-split") as workdir:
            for n in args.models:
                for delta in (False, True):
                    print(f"push: {n} models, delta={delta}", file=sys.stderr)
                    edits = args.edits if n < 1000 else max(3, args.edits)
                    report["push"].append(
                        push.run(
                            Path(workdir), clients=args.clients, models=n, delta=delta, edits=edits
                        )
                    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
