"""Knative-style autoscaling decisions for one version (pure: numbers and a clock in).

Per decision, from the version's average concurrency over two windows (`window`, default
60 s, and a tenth of it, as Knative):

- desired = ceil(stable concurrency / target_concurrency), clamped to [min, max];
- panic: when the panic (short) window's concurrency exceeds twice the capacity of the ready
  replicas (ready x target), scale to ceil(panic concurrency / target) at once and never
  down; panic ends once a whole stable window has passed without that condition;
- scale-down: the result is the largest desired count of the last `stabilization` seconds,
  so a dip shorter than that window does not remove a replica;
- scale to zero: with `min: 0`, a version whose last request is `idle` seconds old gets 0;
  while requests come (or are held by the activator) it keeps at least one replica.

Every decision carries its numbers (`Decision.reason`) for the log, status and /metrics.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from control_plane.config import Autoscale

PANIC_THRESHOLD = 2.0  # panic when the short window wants 200% of the ready capacity


@dataclass(frozen=True)
class Decision:
    at: float
    desired: int
    ready: int
    stable_concurrency: float
    panic_concurrency: float
    panic: bool
    reason: str


@dataclass
class Scaler:
    """Decisions for one version; feed it `observe` samples and ask `decide`."""

    spec: Autoscale
    samples: deque[tuple[float, float]] = field(default_factory=deque)  # (time, concurrency)
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (time, desired)
    panic_until: float | None = None
    last_request: float | None = None
    last: Decision | None = None

    @property
    def stable_window(self) -> float:
        return self.spec.window

    @property
    def panic_window(self) -> float:
        return self.spec.window / 10  # as Knative

    def observe(self, now: float, concurrency: float, requests: int = 0) -> None:
        """One sample of the version's in-flight requests (and requests seen since the last)."""
        self.samples.append((now, concurrency))
        while self.samples and self.samples[0][0] < now - self.stable_window:
            self.samples.popleft()
        if requests or concurrency > 0:
            self.last_request = now

    def average(self, now: float, window: float) -> float:
        values = [c for t, c in self.samples if t >= now - window]
        return sum(values) / len(values) if values else 0.0

    def decide(self, now: float, ready: int) -> Decision:
        spec, target = self.spec, self.spec.target_concurrency
        stable = self.average(now, self.stable_window)
        burst = self.average(now, self.panic_window)
        wanted = math.ceil(stable / target)
        panic_wanted = math.ceil(burst / target)
        if burst > PANIC_THRESHOLD * max(ready, 1) * target and panic_wanted > ready:
            self.panic_until = now + self.stable_window
        panic = self.panic_until is not None and now < self.panic_until
        if not panic:
            self.panic_until = None
        self.recent.append((now, wanted))
        while self.recent and self.recent[0][0] < now - spec.stabilization:
            self.recent.popleft()
        held = max(d for _, d in self.recent)  # scale-down waits the stabilization window
        if panic:
            previous = self.last.desired if self.last else 0
            desired, why = max(panic_wanted, wanted, previous, ready), "panic: no scale-down"
        else:
            desired = held
            why = "stable" if held == wanted else f"held {held} for {spec.stabilization:.0f}s"
        idle = self.last_request is None or now - self.last_request >= spec.idle
        if desired == 0 and not idle:
            desired, why = 1, f"{why}; requests in the last {spec.idle:.0f}s keep one"
        clamped = min(spec.max, max(spec.min, desired))
        if clamped != desired:
            why += f"; clamped to [{spec.min}, {spec.max}]"
        self.last = Decision(
            now,
            clamped,
            ready,
            stable,
            burst,
            panic,
            f"desired {clamped} (ready {ready}): concurrency {stable:.2f} over "
            f"{self.stable_window:.0f}s, {burst:.2f} over {self.panic_window:.0f}s, target "
            f"{target:g}; {why}",
        )
        return self.last
