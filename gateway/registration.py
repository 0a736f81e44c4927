"""Self-registration of a model server with the control plane's admin API."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from gateway.processes import wait_http

log = logging.getLogger("infergate.registration")


@dataclass(frozen=True)
class Registration:
    admin_url: str
    token: str
    model: str
    version: str
    address: str  # ip:port this server listens on

    def _call(self, method: str) -> None:
        body = json.dumps({"model": self.model, "version": self.version, "address": self.address})
        req = urllib.request.Request(
            self.admin_url.rstrip("/") + "/endpoints",
            body.encode(),
            {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()

    def register_when_ready(self) -> threading.Thread:
        """In the background: wait until this server is ready, then register it."""

        def run() -> None:
            try:
                wait_http(f"http://{self.address}/v2/health/ready", timeout=60)
                self._call("POST")
                log.info("registered %s for %s/%s", self.address, self.model, self.version)
            except (OSError, TimeoutError, urllib.error.URLError) as exc:
                log.error("could not register with %s: %s", self.admin_url, exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def deregister(self) -> None:
        try:
            self._call("DELETE")
            log.info("deregistered %s", self.address)
        except (OSError, urllib.error.URLError) as exc:
            log.warning("could not deregister from %s: %s", self.admin_url, exc)
