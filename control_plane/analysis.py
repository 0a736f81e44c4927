"""Judge a canary against its baseline over one analysis window.

Each check pairs a statistical test with the operator's limit, so that noise alone does
not roll a canary back and a significant but harmless difference does not either:

- `error_rate`: the canary's error rate is above `max_error_rate` with confidence
  (one-sided binomial test of its errors against that rate);
- `errors_vs_baseline`: the canary fails more often than the baseline in the same window
  (one-sided Fisher's exact test on the 2x2 table of errors and successes);
- `p99`: more than 1% of canary requests are slower than `max_p99`, with confidence
  (one-sided binomial test; this is "the canary's p99 is above the limit");
- `latency_vs_baseline`: the canary's p99 exceeds `max_p99_ratio` times the baseline's
  and its durations are stochastically larger (one-sided Mann-Whitney U, as Kayenta does).

A check fails only when its p-value is below the alpha it is given (at most `ALPHA` per
interval; the controller splits it between early looks and the decision).
`docs/rollouts.md` gives the false-alarm rate this yields (`bench/rollout_aa.py`).

numpy and scipy.stats are imported where used: they add about 85 MB to the control plane's
memory, needed only while a rollout is judged or shadows are compared. `preload_stats` imports
them in a thread as soon as the file has a rollout, and the control plane does not judge
until they are in: imported on the event loop at the first judgement, they held it (and the
admin API and xDS) for over 5 s in a loaded CI run; a judgement that waited on the thread's
import did too, after a control-plane restart.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from control_plane.config import Rollout, RolloutShadow
from control_plane.telemetry import IntervalStats


def _import_stats() -> None:
    import numpy  # noqa: F401
    import scipy.stats  # noqa: F401


_importer: threading.Thread | None = None


def preload_stats() -> None:
    """Import numpy and scipy.stats in a background thread (once: later calls do nothing)."""
    global _importer
    if _importer is None:
        _importer = threading.Thread(target=_import_stats, daemon=True, name="stats")
        _importer.start()


def stats_importing() -> bool:
    """Whether `preload_stats` is still importing: a judgement now would wait for it on the
    event loop (the import lock), and hold the admin API and xDS with it."""
    return _importer is not None and _importer.is_alive()


ALPHA = 0.01  # per check and window
TAIL = 0.01  # the share of requests allowed above a p99 limit


@dataclass(frozen=True)
class Numbers:
    """What was measured for one version, as shown in status and history: `requests` and
    `errors` scaled up by telemetry sampling (estimates of all requests), `sampled` and
    `sampled_errors` as logged. The statistical tests count the logged ones: scaled counts
    would overstate the evidence by 1/fraction."""

    requests: int
    errors: int
    error_rate: float | None
    p99: float | None
    sampled: int
    sampled_errors: int

    @classmethod
    def of(cls, window: IntervalStats) -> Numbers:
        requests = round(window.requests)
        errors = min(round(window.errors), requests)
        sampled = requests if window.sampled_requests is None else window.sampled_requests
        sampled_errors = errors if window.sampled_errors is None else window.sampled_errors
        rate = sampled_errors / sampled if sampled else None
        import numpy as np

        p99 = float(np.percentile(window.durations, 99)) if len(window.durations) else None
        return cls(requests, errors, rate, p99, sampled, min(sampled_errors, sampled))


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str
    p_value: float | None = None
    alpha: float | None = None  # the check fails when p_value < alpha
    limit: float | None = None


@dataclass(frozen=True)
class Analysis:
    canary: Numbers
    baseline: Numbers
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "canary": asdict(self.canary),
            "baseline": asdict(self.baseline),
            "checks": [asdict(c) for c in self.checks],
        }


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.2%}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}ms"


def _logged(n: Numbers) -> str:
    return "" if n.sampled == n.requests else f" logged (of ~{n.requests})"


def _judge(
    name: str, fails: bool, p: float, alpha: float, said: str, bad: str, good: str, limit=None
) -> Check:
    if fails and p < alpha:
        return Check(name, False, f"{said}{bad} (p={p:.2g} < {alpha:g})", p, alpha, limit)
    return Check(name, True, f"{said}{good} (p={p:.2g})", p, alpha, limit)


def error_rate(c: Numbers, limit: float, alpha: float) -> Check:
    if not c.sampled:
        return Check("error_rate", True, "no canary requests", limit=limit)
    from scipy.stats import binomtest

    p = binomtest(c.sampled_errors, c.sampled, limit, alternative="greater").pvalue
    said = f"{c.sampled_errors} errors in {c.sampled} requests{_logged(c)} ({_pct(c.error_rate)})"
    return _judge(
        "error_rate",
        True,
        p,
        alpha,
        said,
        f" is above the {limit:.2%} limit",
        f": not above the {limit:.2%} limit",
        limit,
    )


def errors_vs_baseline(c: Numbers, b: Numbers, alpha: float) -> Check:
    if not b.sampled:
        return Check("errors_vs_baseline", True, "no baseline requests to compare with")
    table = [
        [c.sampled_errors, c.sampled - c.sampled_errors],
        [b.sampled_errors, b.sampled - b.sampled_errors],
    ]
    from scipy.stats import fisher_exact

    p = fisher_exact(table, alternative="greater").pvalue
    said = f"canary {_pct(c.error_rate)} vs baseline {_pct(b.error_rate)} errors"
    return _judge(
        "errors_vs_baseline",
        True,
        p,
        alpha,
        said,
        ": canary fails more",
        ": no significant difference",
    )


def p99(c: Numbers, durations: Sequence[float], limit: float, alpha: float) -> Check:
    from scipy.stats import binomtest

    slow = sum(1 for d in durations if d > limit)
    p = binomtest(slow, len(durations), TAIL, alternative="greater").pvalue
    said = f"p99 {_ms(c.p99)}; {slow} of {len(durations)} requests slower than {_ms(limit)}"
    return _judge(
        "p99", True, p, alpha, said, ": p99 is above the limit", ": within the limit", limit
    )


def latency_vs_baseline(
    c: Numbers,
    b: Numbers,
    canary: Sequence[float],
    baseline: Sequence[float],
    limit: float,
    alpha: float,
) -> Check:
    if c.p99 is None or b.p99 is None:
        return Check("latency_vs_baseline", True, "no baseline durations to compare with")
    ratio = c.p99 / b.p99 if b.p99 > 0 else math.inf
    from scipy.stats import mannwhitneyu

    p = mannwhitneyu(canary, baseline, alternative="greater").pvalue
    said = f"p99 canary {_ms(c.p99)} vs baseline {_ms(b.p99)} (x{ratio:.2f}, limit x{limit:g})"
    good = ": within the ratio" if ratio <= limit else ": not significantly slower"
    return _judge(
        "latency_vs_baseline", ratio > limit, p, alpha, said, ", canary slower", good, limit
    )


def analyse(
    canary: IntervalStats, baseline: IntervalStats, rollout: Rollout, alpha: float = ALPHA
) -> Analysis:
    """Run every check of `rollout` on one window of canary and baseline measurements."""
    c, b = Numbers.of(canary), Numbers.of(baseline)
    checks = [error_rate(c, rollout.max_error_rate, alpha), errors_vs_baseline(c, b, alpha)]
    if not canary.durations:
        checks.append(Check("latency", True, "no canary durations in the window"))
        return Analysis(c, b, tuple(checks))
    if rollout.max_p99 is not None:
        checks.append(p99(c, canary.durations, rollout.max_p99, alpha))
    checks.append(
        latency_vs_baseline(
            c, b, canary.durations, baseline.durations, rollout.max_p99_ratio, alpha
        )
    )
    return Analysis(c, b, tuple(checks))


FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}


def compare_outputs(
    primary: Sequence[dict], shadow: Sequence[dict], tolerance: RolloutShadow
) -> str | None:
    """Compare two Open Inference Protocol `outputs` lists tensor by tensor: floats within
    `rtol`/`atol`, everything else (integers, booleans, bytes) exactly. Returns None when they
    agree, else what differs first."""
    by_name = {o["name"]: o for o in shadow}
    if sorted(by_name) != sorted(o["name"] for o in primary):
        return f"output names differ: {sorted(o['name'] for o in primary)} vs {sorted(by_name)}"
    for a in primary:
        b = by_name[a["name"]]
        for key in ("datatype", "shape"):
            if a.get(key) != b.get(key):
                return f"{a['name']}: {key} {a.get(key)} vs {b.get(key)}"
        if a.get("datatype") in FLOAT_TYPES:
            import numpy as np

            x, y = np.asarray(a["data"], dtype=float), np.asarray(b["data"], dtype=float)
            if x.shape != y.shape or not np.allclose(
                x, y, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True
            ):
                return (
                    f"{a['name']}: values differ beyond rtol={tolerance.rtol} atol={tolerance.atol}"
                )
        elif a["data"] != b["data"]:
            return f"{a['name']}: values differ"
    return None
