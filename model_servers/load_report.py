"""ORCA load reports for the `endpoint-load-metrics` response header (Envoy's TEXT format)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

HEADER = "endpoint-load-metrics"


class LoadReporter:
    """Counts finished requests and samples process CPU; renders the header value.

    CPU and request rate are recomputed at most every `interval` seconds; the named metrics
    (e.g. queue depth) are read on every call.
    """

    def __init__(self, named: dict[str, Callable[[], float]], interval: float = 0.5) -> None:
        self.named = named
        self.interval = interval
        self._cpus = os.cpu_count() or 1
        self._since = time.monotonic()
        self._cpu_since = time.process_time()
        self._requests = 0
        self._load = self._render(0.0, 0.0)

    def record(self) -> None:
        """Count one finished request."""
        self._requests += 1

    def value(self) -> str:
        """The current header value, e.g. `TEXT cpu_utilization=0.31, rps_fractional=812.0`."""
        now = time.monotonic()
        elapsed = now - self._since
        if elapsed >= self.interval:
            cpu = time.process_time()
            utilization = (cpu - self._cpu_since) / elapsed / self._cpus
            self._load = self._render(utilization, self._requests / elapsed)
            self._since, self._cpu_since, self._requests = now, cpu, 0
        named = "".join(f", named_metrics.{name}={fn():g}" for name, fn in self.named.items())
        return self._load + named

    @staticmethod
    def _render(cpu: float, rps: float) -> str:
        return f"TEXT cpu_utilization={min(max(cpu, 0.0), 1.0):.3f}, rps_fractional={rps:.1f}"
