"""`python -m bench.sampling_accuracy`: what sampling the access logs costs in accuracy.

A seeded simulation (no processes): windows of n real requests with log-normal
latencies (median 20 ms, sigma 0.6, about what the iris server shows); each request is
logged with probability f and counts 1/f, as Envoy and the store do. Per (n, f), over
many windows: the relative error of the scaled count (measured, and the binomial
sqrt((1 - f) / (f n))), and of the p99 from the sampled latencies against the p99 of
all of them. One JSON document on stdout.
"""

from __future__ import annotations

import json
import math
import random
import statistics

from control_plane.telemetry import percentile

WINDOWS = 300
MEDIAN, SIGMA = 0.020, 0.6


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def simulate(n: int, f: float, rng: random.Random) -> dict[str, float]:
    count_errors, p99_errors = [], []
    for _ in range(WINDOWS):
        latencies = [MEDIAN * math.exp(rng.gauss(0, SIGMA)) for _ in range(n)]
        sampled = [x for x in latencies if rng.random() < f]
        count_errors.append(len(sampled) / f / n - 1)
        true_p99 = percentile(sorted(latencies), 99)
        estimate = percentile(sorted(sampled), 99)
        if estimate is not None and true_p99:
            p99_errors.append(estimate / true_p99 - 1)
    abs_p99 = [abs(e) for e in p99_errors]
    return {
        "requests": n,
        "fraction": f,
        "logged_per_window": n * f,
        "count_rel_sd": round(statistics.pstdev(count_errors), 4),
        "count_rel_sd_binomial": round(math.sqrt((1 - f) / (f * n)), 4),
        "p99_rel_bias": round(statistics.fmean(p99_errors), 4),
        "p99_rel_error_median": round(quantile(abs_p99, 0.5), 4),
        "p99_rel_error_90th": round(quantile(abs_p99, 0.9), 4),
    }


def main() -> None:
    rng = random.Random(10)
    rows = [
        simulate(n, f, rng)
        for n in (1_000, 10_000, 40_000)
        for f in (1.0, 0.5, 0.25, 0.125, 0.0625)
        if n * f >= 50
    ]
    conditions = {"windows": WINDOWS, "latency": f"log-normal median {MEDIAN}s sigma {SIGMA}"}
    print(json.dumps({"conditions": conditions, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
