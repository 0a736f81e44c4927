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


def refusal(exc: urllib.error.HTTPError) -> str:
    """`HTTP 403: <the control plane's {"error"} text>`."""
    try:
        reason = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        reason = exc.reason
    return f"HTTP {exc.code}: {reason}"


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

    def register(self) -> None:
        """Register now; raises urllib's errors (HTTPError: see `refusal`)."""
        self._call("POST")

    def register_when_ready(self) -> threading.Thread:
        """In the background: wait until this server is ready, then register it."""

        def run() -> None:
            try:
                wait_http(f"http://{self.address}/v2/health/ready", timeout=60)
                self._call("POST")
                log.info("registered %s for %s/%s", self.address, self.model, self.version)
                return
            except urllib.error.HTTPError as exc:
                why = f"the control plane refused the registration ({refusal(exc)})"
            except (OSError, TimeoutError, urllib.error.URLError) as exc:
                why = f"could not register ({exc})"
            log.error(
                "%s at %s: this server keeps serving %s/%s on %s, but the gateway sends it "
                "no request until it is registered",
                why,
                self.admin_url,
                self.model,
                self.version,
                self.address,
            )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def deregister(self) -> None:
        try:
            self._call("DELETE")
            log.info("deregistered %s", self.address)
        except urllib.error.HTTPError as exc:
            log.warning("deregistering %s was refused (%s)", self.address, refusal(exc))
        except (OSError, urllib.error.URLError) as exc:
            log.warning("could not deregister from %s: %s", self.admin_url, exc)
