"""Start and stop the benchmarked processes: one model server, the control plane, one Envoy."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.load import IRIS_BODY, IRIS_PATH
from gateway.envoy_proxy import envoy_child
from gateway.processes import (
    Child,
    free_port,
    host_port,
    infergate_command,
    model_server_child,
    wait_http,
)

LOCAL = "127.0.0.1"


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


cli = infergate_command


class BenchStack:
    """iris v1 behind a control plane and one Envoy, on free ports of 127.0.0.1.

    The routing file lists v1 and v2; both point at the single v1 server, so that
    weight edits change routes only (no new clusters or endpoints).
    """

    def __init__(
        self, workdir: Path, repository: Path, control_plane_options: tuple[str, ...] = ()
    ):
        self.workdir = workdir
        self.control_plane_options = control_plane_options
        self.repository = repository
        self.config = workdir / "routing.yaml"
        self.model = (LOCAL, free_port())
        self.listen = (LOCAL, free_port())
        self.xds = (LOCAL, free_port())
        self.admin = (LOCAL, free_port())
        self.envoy_admin = (LOCAL, free_port())
        self.children: list[Child] = []

    @property
    def direct_url(self) -> str:
        return f"http://{host_port(self.model)}{IRIS_PATH}"

    @property
    def gateway_url(self) -> str:
        return f"http://{host_port(self.listen)}{IRIS_PATH}"

    def _start(self, child: Child) -> Child:
        self.children.append(child)
        return child.start()

    def start(self) -> None:
        """Start everything and wait until Envoy serves inference with the first config."""
        model = self._start(
            model_server_child(
                str(self.repository), "iris", "v1", self.model, str(self.workdir / "model-v1.log")
            )
        )
        wait_http(f"http://{host_port(self.model)}/v2/health/ready", child=model)
        self.route({"v1": 100, "v2": 0})
        self.start_control_plane()
        envoy = self._start(envoy_child("bench-envoy", self.xds, self.envoy_admin, self.workdir))
        wait_http(f"http://{host_port(self.envoy_admin)}/ready", timeout=30, child=envoy)
        self._wait_inference(self.gateway_url)

    def start_control_plane(self, watch: str = "auto", source: Path | None = None) -> None:
        """Start (or restart) the control plane, seeing file edits the `watch` way; its code
        from the source tree `source` (e.g. an older commit) instead of this one if given."""
        for child in [c for c in self.children if c.name == "control plane"]:
            child.stop()
            self.children.remove(child)
        prefix = ["env", "-C", str(source), f"PYTHONPATH={source}"] if source else []
        cp = self._start(
            Child(
                "control plane",
                prefix
                + cli(
                    "control-plane",
                    str(self.config),
                    "--xds",
                    host_port(self.xds),
                    "--admin",
                    host_port(self.admin),
                    "--watch",
                    watch,
                    *self.control_plane_options,
                ),
                str(self.workdir / f"control-plane-{watch}.log"),
            )
        )
        wait_http(f"http://{host_port(self.admin)}/healthz", child=cp)
        self.watch = watch

    def stop(self) -> None:
        """Stop every started process, newest first."""
        for child in reversed(self.children):
            child.stop()

    def __enter__(self) -> BenchStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_inference(self, url: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            req = urllib.request.Request(
                url, IRIS_BODY.encode(), {"content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    # --- routing and observation ----------------------------------------------------
    def route(self, traffic: dict[str, int]) -> None:
        """Write the routing file atomically (write a temp file, then rename over it)."""
        lines = [f"listen: {host_port(self.listen)}", "models:", "  iris:", "    versions:"]
        lines += [f"      {v}: {{endpoints: [{host_port(self.model)}]}}" for v in traffic]
        lines.append("    traffic: {" + ", ".join(f"{v}: {w}" for v, w in traffic.items()) + "}")
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config)

    def status(self) -> dict[str, Any]:
        """The control plane's `GET /status`."""
        return get_json(f"http://{host_port(self.admin)}/status")

    def wait_converged(self, timeout: float = 30) -> None:
        """Wait until a connected Envoy has ACKed every type of the current snapshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            want = (st["snapshot"] or {}).get("types", {})
            for node in st["nodes"]:
                acked = {t: s.get("acked_version") for t, s in node["types"].items()}
                if node["connected"] and want and all(acked.get(t) == v for t, v in want.items()):
                    return
            time.sleep(0.05)
        raise TimeoutError("Envoy did not converge on the control plane's snapshot")

    def apply_times_ms(self) -> list[float]:
        """Build times the control plane logged for each applied config, oldest first."""
        text = (self.workdir / f"control-plane-{self.watch}.log").read_text(errors="replace")
        return [float(m) for m in re.findall(r"applied config \S+ \(.*?\) in ([\d.]+) ms", text)]
