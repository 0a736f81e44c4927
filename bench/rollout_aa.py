"""A/A false-alarm rate of the rollout defaults, by simulation, beside the detection of bad
canaries.

`python -m bench.rollout_aa [--rollouts N]` runs many rollouts of the real controller
(`control_plane.rollout`) and prints JSON. A/A: canary and baseline draw requests from the
same error rate and latency distribution; per traffic level and error rate, the fraction
of rollouts rolled back (with a 95% confidence interval), and for comparison the fraction a
plain threshold rule (observed error rate > max_error_rate or observed p99 ratio >
max_p99_ratio, no test) would have rolled back on the same windows. Bad canaries (5%
errors; three times slower): the fraction rolled back at the first analysis, and the time
to the rollback. Each scenario runs with early looks on and off, on the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

from bench.__main__ import git_revision
from control_plane.config import parse
from control_plane.rollout import RolloutController
from control_plane.state_store import Conflict, Stored
from control_plane.telemetry import IntervalStats

ROUTING = """\
models:
  m:
    versions:
      v1: {endpoints: [127.0.0.1:9001]}
      v2: {endpoints: [127.0.0.1:9002]}
    traffic: {v1: 100}
    rollout: {canary: v2%s}
"""


class MemoryStore:
    """The StateStore interface in memory: the simulation measures decisions, not disks."""

    def __init__(self) -> None:
        self.docs: dict[str, Stored] = {}

    def get(self, key: str) -> Stored | None:
        return self.docs.get(key)

    def put(self, key: str, value: dict[str, Any], revision: int) -> int:
        found = self.docs[key].revision if key in self.docs else 0
        if found != revision:
            raise Conflict(key)
        self.docs[key] = Stored(value, revision + 1)
        return revision + 1


@dataclass(frozen=True)
class Canary:
    """How the canary differs from the baseline (nothing: an A/A run)."""

    errors: float | None = None
    slowdown: float = 1.0

    def label(self) -> str:
        if self.errors:
            return f"canary fails {self.errors:.0%}"
        return f"canary {self.slowdown:g}x slower" if self.slowdown != 1 else "A/A"


class Traffic:
    """Requests split by the controller's weights; every version has the same error rate
    and lognormal latency (median `median_s`, shape `sigma`). Implements Measurements."""

    def __init__(self, rng: np.random.Generator, rps: float, errors: float, canary: Canary):
        self.rng, self.rps, self.errors, self.canary = rng, rps, errors, canary
        self.median, self.sigma = 0.05, 0.5
        self.rows: dict[str, list[np.ndarray]] = {}

    def run(self, t0: float, t1: float, weights: dict[str, int]) -> None:
        for version, weight in weights.items():
            n = self.rng.poisson(self.rps * (t1 - t0) * weight / 100)
            block = np.empty((n, 3))
            block[:, 0] = self.rng.uniform(t0, t1, n)
            errors, slowdown = (
                (self.canary.errors or self.errors, self.canary.slowdown)
                if version == "v2"
                else (self.errors, 1.0)
            )
            block[:, 1] = self.rng.random(n) < errors
            block[:, 2] = self.rng.lognormal(math.log(self.median * slowdown), self.sigma, n)
            self.rows.setdefault(version, []).append(block)

    def interval(self, model: str, version: str, since: float, until: float | None = None):
        rows = np.concatenate(self.rows.get(version, [np.empty((0, 3))]))
        end = math.inf if until is None else until
        rows = rows[(rows[:, 0] >= since) & (rows[:, 0] < end)]
        return IntervalStats(len(rows), float(rows[:, 1].sum()), tuple(rows[:, 2]))


def threshold_only(history: list[dict[str, Any]], max_error_rate: float, ratio: float) -> bool:
    """Would a plain threshold rule (no test) have failed one of these analyses?"""
    for h in history:
        c, b = h.get("canary"), h.get("baseline")
        if not c or not h.get("checks"):
            continue
        if (c["error_rate"] or 0) > max_error_rate:
            return True
        if c["p99"] and b["p99"] and c["p99"] / b["p99"] > ratio:
            return True
    return False


def simulate(
    rollouts: int, rps: float, errors: float, extra: str, seed: int, canary: Canary, early: bool
) -> dict[str, Any]:
    config = parse(ROUTING % extra)
    spec = config.models[0].rollout
    rng = np.random.default_rng(seed)
    outcomes: dict[str, int] = {}
    failed_checks: dict[str, int] = {}
    naive = first = 0
    durations = []
    for _ in range(rollouts):
        traffic = Traffic(rng, rps, errors, canary)
        controller = RolloutController(traffic, MemoryStore(), early=early)
        controller.observe_config(config, 0.0)
        t = 0.0
        while controller.status()["m"]["phase"] in ("shadowing", "progressing"):
            traffic.run(t, t + 1, controller.overrides()["m"].traffic)
            t += 1
            controller.tick(t)
        status = controller.status()["m"]
        outcomes[status["phase"]] = outcomes.get(status["phase"], 0) + 1
        durations.append(t)
        for check in status["history"][-1].get("checks", []):
            if not check["passed"]:
                failed_checks[check["name"]] = failed_checks.get(check["name"], 0) + 1
        naive += threshold_only(status["history"], spec.max_error_rate, spec.max_p99_ratio)
        analyses = [h["kind"] for h in status["history"] if h.get("checks")]
        first += analyses[:1] == ["rollback"]
    rolled_back = outcomes.get("rolled_back", 0)
    ci = binomtest(rolled_back, rollouts).proportion_ci(0.95)
    return {
        "run": canary.label(),
        "early_looks": early,
        "rps": rps,
        "error_rate": errors,
        "rollout": extra.lstrip(", ") or "defaults",
        "rollouts": rollouts,
        "outcomes": outcomes,
        "rolled_back_rate": round(rolled_back / rollouts, 4),
        "rolled_back_ci95": [round(ci.low, 4), round(ci.high, 4)],
        "rolled_back_at_first_analysis": round(first / rollouts, 4),
        "failed_checks": failed_checks,
        "threshold_only_rate": round(naive / rollouts, 4),
        "median_rollout_s": float(np.median(durations)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rollout_aa", description=__doc__)
    p.add_argument("--rollouts", type=int, default=400, help="rollouts per scenario")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    started = time.perf_counter()
    p99 = 0.05 * math.exp(2.326 * 0.5)  # the true p99 of the simulated latency
    aa, bad = Canary(), (Canary(errors=0.05), Canary(slowdown=3))
    scenarios = [(rps, e, "", aa) for rps in (20, 100, 1000) for e in (0.001, 0.005)]
    scenarios.append((100, 0.001, f", max_p99: {round(p99 * 1.2 * 1000)}ms", aa))
    scenarios += [(rps, 0.001, "", canary) for canary in bad for rps in (100, 1000)]
    results = [
        simulate(args.rollouts, rps, errors, extra, args.seed + i, canary, early)
        for i, (rps, errors, extra, canary) in enumerate(scenarios)
        for early in (True, False)  # side by side, on the same seed
    ]
    doc = {
        "benchmark": "rollout_aa",
        "git": git_revision(),
        "conditions": {
            "latency": "lognormal, median 50ms, sigma 0.5 (p99 160ms), same for both versions",
            "interval_s": 10,
            "tick_s": 1,
            "early_looks": "on: alpha spending between decisions; off: one test per interval",
            "seed": args.seed,
        },
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
