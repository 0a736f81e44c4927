"""Self-registration of a model server with the control plane's admin API."""

from __future__ import annotations

import json
import logging
import threading
import time
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

    def register_when_ready(self, retry_max: float = 5.0) -> threading.Thread:
        """In the background: wait until this server is ready, then register it. A control
        plane that can't be reached yet (not started, restarting) is retried with back-off
        up to `retry_max` seconds apart, for as long as this server runs; a refusal is final."""

        def run() -> None:
            try:
                wait_http(f"http://{self.address}/v2/health/ready", timeout=60)
            except (OSError, TimeoutError) as exc:
                return self._unregistered(f"never became ready ({exc})")
            delay, warned = 0.2, False
            while True:
                try:
                    self._call("POST")
                    break
                except urllib.error.HTTPError as exc:
                    why = f"the control plane refused the registration ({refusal(exc)})"
                    return self._unregistered(why)
                except (OSError, urllib.error.URLError) as exc:
                    if not warned:
                        log.warning(
                            "could not register with %s yet (%s); retrying until it answers",
                            self.admin_url,
                            exc,
                        )
                        warned = True
                    time.sleep(delay)
                    delay = min(delay * 2, retry_max)
            log.info("registered %s for %s/%s", self.address, self.model, self.version)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _unregistered(self, why: str) -> None:
        log.error(
            "%s at %s: this server keeps serving %s/%s on %s, but the gateway sends it "
            "no request until it is registered",
            why,
            self.admin_url,
            self.model,
            self.version,
            self.address,
        )

    def deregister(self) -> None:
        try:
            self._call("DELETE")
            log.info("deregistered %s", self.address)
        except urllib.error.HTTPError as exc:
            log.warning("deregistering %s was refused (%s)", self.address, refusal(exc))
        except (OSError, urllib.error.URLError) as exc:
            log.warning("could not deregister from %s: %s", self.admin_url, exc)
