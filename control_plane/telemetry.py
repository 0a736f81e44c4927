"""The telemetry store: per model and version, what Envoy reported about each request.

Envoy streams one record per request (`access_log.py`); the store keeps, per version:
- time buckets (`resolution` seconds, the last `keep` seconds) of weighted counts by
  status class, errors and the sum of durations: requests/s, error rate and average
  concurrency over any recent interval;
- the newest `max_durations` (time, duration) pairs: latency percentiles;
- cumulative totals and a latency histogram since start (Prometheus counters);
- a coarse history (`history_step` seconds, the last `history` seconds) for plots.

and per consumer and model (`ConsumerUsage`), every request that named a model, also
those rejected before reaching a version: requests by outcome (`outcome`).

Counts are weighted: a record sampled at fraction f counts 1/f requests. The clock is
injected, so that tests drive time directly.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from control_plane.config import RoutingConfig

# Envoy's response flags that mean Envoy itself failed the request (no upstream answer).
LOCAL_FAILURE_FLAGS = frozenset(
    {"UH", "UF", "UO", "NR", "URX", "NC", "UC", "UT", "LH", "DPE", "UPE", "UMSDR", "OM", "DF"}
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")
# Latency histogram bounds (seconds), also the Prometheus histogram's buckets.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class RequestRecord:
    model: str
    # from the upstream cluster "model/version" (gRPC: "model/version/grpc"); "" when the
    # request reached no version (rejected by a filter before the router chose one)
    version: str
    code: int  # HTTP response code, 0 if none
    flags: str  # Envoy response flags, e.g. "UF,URX" or ""
    duration: float  # seconds
    request_id: str
    consumer: str | None = None  # the x-infergate-consumer request header
    details: str = ""  # Envoy's response code details, e.g. "via_upstream"


@dataclass(frozen=True)
class IntervalStats:
    requests: float  # scaled up by 1/sampling fraction
    errors: float  # 5xx plus Envoy local failures (code 0 or flags such as UF, UH, NR, UO)
    durations: tuple[float, ...]  # per-request durations (sampled, bounded: newest N)
    # The records behind `requests` and `errors` as logged (not scaled): what statistical
    # tests must count. None: not sampled, the same as `requests` and `errors`.
    sampled_requests: int | None = None
    sampled_errors: int | None = None


def status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 600 else "none"


def is_local_failure(record: RequestRecord) -> bool:
    """Envoy failed the request itself: no upstream answer, or a failure flag."""
    return record.code == 0 or any(f in LOCAL_FAILURE_FLAGS for f in record.flags.split(",") if f)


def is_error(record: RequestRecord) -> bool:
    return record.code >= 500 or is_local_failure(record)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of sorted values, None if there are none."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def histogram_quantile(counts: list[float], q: float) -> float | None:
    """Upper bound of the DURATION_BUCKETS bucket holding quantile q (0..1); beyond the
    last bound, the last bound."""
    total = sum(counts)
    if not total:
        return None
    seen = 0.0
    for bound, n in zip((*DURATION_BUCKETS, DURATION_BUCKETS[-1]), counts, strict=True):
        seen += n
        if seen >= q * total:
            return bound
    return DURATION_BUCKETS[-1]


@dataclass
class _Bucket:
    slot: int  # start time / step
    requests: float = 0.0
    errors: float = 0.0
    records: int = 0  # requests as logged (not scaled)
    error_records: int = 0
    local_failures: float = 0.0
    duration_sum: float = 0.0
    classes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    histogram: list[float] | None = None  # history buckets only: counts per DURATION_BUCKETS


@dataclass
class _Series:
    """One model version's data."""

    buckets: deque[_Bucket]
    durations: deque[tuple[float, float]]
    history: deque[_Bucket]
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    histogram: list[float] = field(default_factory=lambda: [0.0] * (len(DURATION_BUCKETS) + 1))
    duration_total: float = 0.0


# --- per consumer and model ---------------------------------------------------------
# The outcomes, in the order the tables show them.
OUTCOMES = (
    "ok",  # 1xx to 3xx
    "unauthorized",  # 401: missing or unknown credential
    "forbidden",  # 403: a consumer without access to the model
    "too_large",  # 413: request body over the limit
    "rate_limited",  # 429 from Envoy's local rate limit
    "over_quota",  # 429 from the global rate limit service (or it failed closed)
    "shed",  # load shedding: overflow, adaptive concurrency, admission control, overload
    "client_error",  # other 4xx (e.g. 404 for an unknown model)
    "error",  # 5xx and Envoy's local failures (no response, no healthy upstream, ...)
)
ANONYMOUS = "(anonymous)"
OTHER = "(other)"  # every (consumer, model) pair beyond the store's bound

# Envoy's response code details (%RESPONSE_CODE_DETAILS%) and flags per outcome; the
# strings are those of Envoy 1.40's filters (local_ratelimit, ratelimit,
# adaptive_concurrency, admission_control, the overload manager, the router).
RATE_LIMITED_DETAILS = frozenset({"local_rate_limited"})
OVER_QUOTA_DETAILS = frozenset({"request_rate_limited", "rate_limiter_error"})
SHED_DETAILS = frozenset(
    {"reached_concurrency_limit", "denied_by_admission_control", "overload", "drop_overload"}
)
SHED_FLAGS = frozenset({"UO", "OM"})  # upstream overflow, overload manager
CODE_OUTCOMES = {401: "unauthorized", 403: "forbidden", 413: "too_large"}


def outcome(record: RequestRecord) -> str:
    """What happened to the request, by Envoy's details first (a local reply mapper may
    change the code a filter chose), then the response code."""
    if 100 <= record.code < 400 and not record.flags:
        return "ok"  # the common case, at once
    flags = set(record.flags.split(",")) if record.flags else set()
    details = record.details
    if flags & SHED_FLAGS or details in SHED_DETAILS:
        return "shed"
    if details in RATE_LIMITED_DETAILS:
        return "rate_limited"
    if details in OVER_QUOTA_DETAILS or "RLSE" in flags:
        return "over_quota"
    if record.code in CODE_OUTCOMES:
        return CODE_OUTCOMES[record.code]
    if record.code == 429:
        return "rate_limited" if "RL" in flags else "client_error"
    if 400 <= record.code < 500:
        return "client_error"
    return "error" if is_error(record) else "ok"


def consumer_of(record: RequestRecord, kind: str) -> str:
    """The consumer a request counts for: a 401 has none that was authenticated, so it
    counts as anonymous whatever the client claimed in the header."""
    if kind == "unauthorized" or not record.consumer:
        return ANONYMOUS
    return record.consumer


@dataclass
class _Counts:
    """Weighted requests by outcome."""

    by_outcome: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0.0))

    def add(self, other: dict[str, float]) -> None:
        for kind, n in other.items():
            self.by_outcome[kind] += n

    def report(self) -> dict[str, Any]:
        return {"requests": sum(self.by_outcome.values()), "outcomes": dict(self.by_outcome)}


@dataclass
class _UsageBucket:
    slot: int
    counts: _Counts = field(default_factory=_Counts)


@dataclass
class _UsageRow:
    buckets: deque[_UsageBucket]
    total: _Counts = field(default_factory=_Counts)


@dataclass
class ConsumerUsage:
    """Per (consumer, model): totals since start by outcome and `resolution`-second
    buckets of the last `keep` seconds. At most `max_rows` pairs (the header and the
    model in a path are the client's to choose); the rest count as (OTHER, OTHER)."""

    clock: Callable[[], float]
    resolution: float = 1.0
    keep: float = 60.0
    max_rows: int = 1000
    rows: dict[tuple[str, str], _UsageRow] = field(default_factory=dict, init=False)

    def add(self, record: RequestRecord, weight: float, now: float) -> None:
        kind = outcome(record)
        key = (consumer_of(record, kind), record.model)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_rows:
                key = (OTHER, OTHER)
            row = self.rows.get(key) or _UsageRow(
                deque(maxlen=int(self.keep / self.resolution) + 1)
            )
            self.rows[key] = row
        slot = math.floor(now / self.resolution)
        if not row.buckets or row.buckets[-1].slot < slot:
            row.buckets.append(_UsageBucket(slot))
        row.buckets[-1].counts.by_outcome[kind] += weight
        row.total.by_outcome[kind] += weight

    def totals(self) -> dict[tuple[str, str], dict[str, float]]:
        """Requests since start by outcome, per (consumer, model) (Prometheus counters)."""
        return {key: dict(row.total.by_outcome) for key, row in sorted(self.rows.items())}

    def window(self, consumer: str, model: str, seconds: float) -> dict[str, Any]:
        """Requests and their outcomes in the last `seconds` (to the resolution)."""
        low = math.floor((self.clock() - seconds) / self.resolution)
        counts = _Counts()
        row = self.rows.get((consumer, model))
        for bucket in row.buckets if row else ():
            if bucket.slot > low:  # the last `seconds` whole seconds, this one included
                counts.add(bucket.counts.by_outcome)
        return counts.report()

    def report(self, windows: tuple[int, ...]) -> list[dict[str, Any]]:
        """One entry per (consumer, model): each window's and the total's requests and
        outcomes."""
        return [
            {
                "consumer": consumer,
                "model": model,
                "windows": {f"{s}s": self.window(consumer, model, s) for s in windows},
                "total": row.total.report(),
            }
            for (consumer, model), row in sorted(self.rows.items())
        ]


class TelemetryStore:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        resolution: float = 0.1,
        keep: float = 120.0,
        max_durations: int = 20_000,
        history_step: float = 10.0,
        history: float = 900.0,
    ):
        self.clock = clock
        self.resolution = resolution
        self.keep = keep
        self.max_durations = max_durations
        self.history_step = history_step
        self.history_len = int(history / history_step)
        self.series: dict[tuple[str, str], _Series] = {}
        self.usage = ConsumerUsage(clock)
        self.records = 0  # records received (not scaled)

    # --- writing ---------------------------------------------------------------------
    def _series(self, model: str, version: str) -> _Series:
        key = (model, version)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(
                deque(maxlen=int(self.keep / self.resolution) + 1),
                deque(maxlen=self.max_durations),
                deque(maxlen=self.history_len),
            )
        return series

    @staticmethod
    def _bucket(buckets: deque[_Bucket], now: float, step: float, histogram: bool) -> _Bucket:
        slot = math.floor(now / step)
        if not buckets or buckets[-1].slot < slot:
            buckets.append(
                _Bucket(slot, histogram=[0.0] * (len(DURATION_BUCKETS) + 1) if histogram else None)
            )
        return buckets[-1]

    def add(self, record: RequestRecord, weight: float = 1.0) -> None:
        """Count one request that Envoy logged now; `weight` is 1 / its sampling fraction.
        A request that reached no version counts only in the consumers' usage."""
        now = self.clock()
        self.records += 1
        self.usage.add(record, weight, now)
        if not record.version:
            return
        series = self._series(record.model, record.version)
        cls = status_class(record.code)
        error = is_error(record)
        local = is_local_failure(record)
        slot = bisect.bisect_left(DURATION_BUCKETS, record.duration)
        history = self._bucket(series.history, now, self.history_step, True)
        for bucket in (self._bucket(series.buckets, now, self.resolution, False), history):
            bucket.requests += weight
            bucket.errors += weight if error else 0.0
            bucket.local_failures += weight if local else 0.0
            bucket.duration_sum += weight * record.duration
            bucket.classes[cls] += weight
            bucket.records += 1
            bucket.error_records += error
        history.histogram[slot] += weight  # type: ignore[index]
        series.durations.append((now, record.duration))
        series.totals[cls] += weight
        series.histogram[slot] += weight
        series.duration_total += weight * record.duration

    def add_all(self, records: Iterable[tuple[RequestRecord, float]]) -> None:
        for record, weight in records:
            self.add(record, weight)

    # --- reading ---------------------------------------------------------------------
    def versions(self) -> list[tuple[str, str]]:
        return sorted(self.series)

    def interval(
        self, model: str, version: str, since: float, until: float | None = None
    ) -> IntervalStats:
        """Requests logged at clock times in [since, until) (until: now), to the store's
        resolution: the buckets from the one holding `since` to the one before `until`."""
        series = self.series.get((model, version))
        if series is None:
            return IntervalStats(0.0, 0.0, (), 0, 0)
        low = math.floor(since / self.resolution)
        if until is None:
            until = math.inf
            high = math.floor(self.clock() / self.resolution) + 1
        else:
            high = math.floor(until / self.resolution)
        buckets = [b for b in series.buckets if low <= b.slot < high]
        return IntervalStats(
            requests=sum(b.requests for b in buckets),
            errors=sum(b.errors for b in buckets),
            durations=tuple(d for t, d in series.durations if since <= t < until),
            sampled_requests=sum(b.records for b in buckets),
            sampled_errors=sum(b.error_records for b in buckets),
        )

    def window(self, model: str, version: str, seconds: float) -> dict[str, Any]:
        """The last `seconds`: requests/s, error rate, p50/p95/p99 (seconds), average
        concurrency (sum of durations / window length), counts by status class and of
        Envoy's local failures."""
        now = self.clock()
        since = now - seconds
        series = self.series.get((model, version))
        low = math.floor(since / self.resolution)
        buckets = [b for b in series.buckets if b.slot >= low] if series else []
        requests = sum(b.requests for b in buckets)
        errors = sum(b.errors for b in buckets)
        classes: dict[str, float] = defaultdict(float)
        for b in buckets:
            for cls, n in b.classes.items():
                classes[cls] += n
        start = low * self.resolution
        durations = sorted(d for t, d in series.durations if t >= start) if series else []
        return {
            "requests": requests,
            "requests_per_second": requests / seconds,
            "error_rate": errors / requests if requests else 0.0,
            "p50": percentile(durations, 50),
            "p95": percentile(durations, 95),
            "p99": percentile(durations, 99),
            "concurrency": sum(b.duration_sum for b in buckets) / seconds,
            "local_failures": sum(b.local_failures for b in buckets),
            "status_classes": dict(sorted(classes.items())),
        }

    def totals(self, model: str, version: str) -> dict[str, float]:
        """Requests since start by status class (for Prometheus counters)."""
        return dict(self.series[(model, version)].totals)

    def histogram(self, model: str, version: str) -> tuple[list[float], float]:
        """Per-bucket counts (DURATION_BUCKETS, then +Inf) and the sum of durations."""
        series = self.series[(model, version)]
        return list(series.histogram), series.duration_total

    def history(self, model: str, version: str) -> list[dict[str, Any]]:
        """Per `history_step` seconds of the last 15 minutes (steps with requests): start
        (clock time), requests/s, error rate and p99 (the upper bound of the histogram
        bucket that holds it)."""
        series = self.series.get((model, version))
        return [
            {
                "t": b.slot * self.history_step,
                "requests_per_second": b.requests / self.history_step,
                "error_rate": b.errors / b.requests if b.requests else 0.0,
                "p99": histogram_quantile(b.histogram or [], 0.99),
            }
            for b in (series.history if series else ())
        ]

    def total_rate(self, seconds: float = 10.0) -> float:
        """Logged requests/s (scaled) over all versions in the last `seconds`."""
        return sum(self.window(m, v, seconds)["requests_per_second"] for m, v in self.series)


def traffic_report(
    store: TelemetryStore,
    config: RoutingConfig | None,
    sample_fraction: float,
    history: bool = False,
    windows: tuple[int, ...] = (10, 60),
) -> dict[str, Any]:
    """Per model and version (configured, or seen in the store): weight, shadow percent,
    and each window's statistics; with `history`, the last 15 minutes with step starts in
    seconds relative to now. Per consumer and model: requests by outcome in each window
    and since start."""
    models: dict[str, dict[str, Any]] = {}
    for model in config.models if config else ():
        total = sum(w for _, w in model.traffic) or 1
        entry = models[model.name] = {"versions": {}}
        for version in model.versions:
            weight = dict(model.traffic).get(version.name, 0)
            shadow = (
                model.shadow.percent if model.shadow and model.shadow.version == version.name else 0
            )
            entry["versions"][version.name] = {
                "weight": weight,
                "weight_percent": 100 * weight / total,
                "shadow_percent": shadow,
            }
    for name, version in store.versions():
        models.setdefault(name, {"versions": {}})["versions"].setdefault(
            version, {"weight": None, "weight_percent": None, "shadow_percent": None}
        )
    now = store.clock()
    for name, entry in models.items():
        for version, row in entry["versions"].items():
            row["windows"] = {f"{s}s": store.window(name, version, s) for s in windows}
            if history:
                row["history"] = [
                    {**point, "t": point["t"] - now} for point in store.history(name, version)
                ]
    return {
        "sample_fraction": sample_fraction,
        "records": store.records,
        "models": models,
        "consumers": store.usage.report(windows),
    }
