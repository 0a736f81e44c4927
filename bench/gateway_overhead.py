"""Gateway overhead: the same load, interleaved, direct to the model server and through Envoy."""

from __future__ import annotations

import sys
from typing import Any

from bench.load import AiohttpLoad, LoadResult, WrkLoad, medians
from bench.stack import BenchStack
from bench.stats import alternating, median


def run(
    stack: BenchStack,
    load: WrkLoad | AiohttpLoad,
    concurrencies: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    seconds: float = 5.0,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """Per concurrency: medians over `rounds` of direct and gateway, their ratios, every round.

    Each round measures both targets back to back; the one that goes first alternates.
    """
    targets = {"direct": stack.direct_url, "gateway": stack.gateway_url}
    for url in targets.values():
        load.run(url, max(concurrencies), warmup)
    results: dict[str, Any] = {}
    for c in concurrencies:
        per_target: dict[str, list[LoadResult]] = {name: [] for name in targets}
        for i in range(rounds):
            order = alternating(list(targets), i)
            for name in order:
                result = load.run(targets[name], c, seconds)
                per_target[name].append(result)
                print(
                    f"  c={c} round {i + 1}/{rounds} {name:7}: {result.rps:8.1f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms",
                    file=sys.stderr,
                )
        direct, gateway = medians(per_target["direct"]), medians(per_target["gateway"])
        # Ratios per round (same round, adjacent in time), then their median.
        rps_ratios = [g.rps / d.rps for d, g in zip(*per_target.values(), strict=True)]
        p50_deltas = [g.p50_ms - d.p50_ms for d, g in zip(*per_target.values(), strict=True)]
        results[f"c{c}"] = {
            "concurrency": c,
            "direct": direct,
            "gateway": gateway,
            "gateway_over_direct_rps": round(median(rps_ratios), 3),
            "p50_delta_ms": round(median(p50_deltas), 3),
            "p99_delta_ms": round(gateway["p99_ms"] - direct["p99_ms"], 3),
            "rounds": {name: [r.as_dict() for r in rs] for name, rs in per_target.items()},
        }
    return {"seconds_per_run": seconds, "rounds": rounds, "results": results}
