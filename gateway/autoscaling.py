"""Feed the autoscaler from the control plane's telemetry and turn decisions into counts.

Every `PERIOD` seconds the supervisor calls `Autoscaling.step`: it reads `GET /traffic` (the
telemetry store's per-version windows, i.e. what every Envoy reported, not one Envoy's view),
gives each autoscaled version's 10 s average concurrency to its `Scaler`, and returns the
desired replica counts. A decision that changes a count is logged with its numbers; the last
decision of each version is kept for `infergate status` and reported to the control plane
(`PUT /autoscaling`), which shows it in its `/status` and on `/metrics`.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict

from control_plane.autoscaler import Scaler
from control_plane.config import RoutingConfig

log = logging.getLogger("infergate.autoscaler")

PERIOD = 1.0
SIGNAL_WINDOW = "10s"  # the store's shortest window

Key = tuple[str, str]


class Autoscaling:
    def __init__(self, admin_url: str, token: str):
        self.admin_url = admin_url
        self.token = token
        self.scalers: dict[Key, Scaler] = {}

    def follow(self, config: RoutingConfig) -> None:
        """Keep a scaler per autoscaled version (a changed spec starts a new one)."""
        specs = {
            (m.name, v.name): v.autoscale for m in config.models for v in m.versions if v.autoscale
        }
        self.scalers = {
            key: old if (old := self.scalers.get(key)) and old.spec == spec else Scaler(spec)
            for key, spec in specs.items()
        }

    def desired(self) -> dict[Key, int]:
        """Each autoscaled version's count: its last decision, else its `min`."""
        return {key: s.last.desired if s.last else s.spec.min for key, s in self.scalers.items()}

    def step(self, now: float, ready: dict[Key, int], held: dict[Key, int]) -> bool:
        """Sample, decide; True when some desired count changed. `held`: requests the
        activator holds per version (they count as concurrency and as activity)."""
        if not self.scalers:
            return False
        traffic = self._traffic()
        if traffic is None:
            return False
        before = self.desired()
        for (model, version), scaler in self.scalers.items():
            row = traffic.get(model, {}).get("versions", {}).get(version, {})
            window = row.get("windows", {}).get(SIGNAL_WINDOW, {})
            waiting = held.get((model, version), 0)
            scaler.observe(now, window.get("concurrency", 0.0) + waiting, waiting)
            decision = scaler.decide(now, ready.get((model, version), 0))
            if decision.desired != before[(model, version)]:
                log.info("%s/%s: %s", model, version, decision.reason)
        self._report()
        return self.desired() != before

    def _traffic(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.admin_url + "/traffic", timeout=1) as resp:
                return json.load(resp)["models"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None

    def _report(self) -> None:
        """Tell the control plane; it being away costs only this report (logged at debug)."""
        req = urllib.request.Request(
            self.admin_url + "/autoscaling",
            json.dumps(self.status()).encode(),
            {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="PUT",
        )
        try:
            with urllib.request.urlopen(req, timeout=1) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            log.debug("could not report decisions to the control plane: %s", exc)

    def status(self) -> dict[str, dict]:
        return {f"{m}/{v}": asdict(s.last) for (m, v), s in self.scalers.items() if s.last}
