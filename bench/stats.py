"""Small statistics helpers shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
        "n": len(ms),
    }


def alternating(names: Sequence[str], round_index: int) -> list[str]:
    """The order of one round of side-by-side runs: reversed every other round, so neither
    side always goes first."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def emit(report: dict[str, Any]) -> int:
    """Print a benchmark's JSON report on stdout; the exit code (0)."""
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
