"""The control plane as a child process, with its CPU time, memory and build log."""

from __future__ import annotations

import os
import re
import signal
import sys
from datetime import datetime
from pathlib import Path

from gateway.processes import Child, free_port, host_port, wait_http

LOCAL = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Run the control plane from this source tree instead of ours (`--plane-source`: an older
# commit unpacked with `git archive`, to compare side by side).
PLANE_SOURCE: Path | None = None
HEALTH_INTERVAL = 0.0  # the control plane's endpoint probes: off unless asked for
APPLIED = re.compile(r"^(\S+ \S+) infergate\.control_plane INFO applied config .* in ([\d.]+) ms$")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set size now (`rss_mb`) and its peak (`peak_rss_mb`), from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(
                int(value.split()[0]) / 1024, 1
            )
    return out


class PlaneProcess:
    """`gateway.cli control-plane` on free ports; `module` swaps in a profiling wrapper."""

    def __init__(
        self,
        config: Path,
        log: Path,
        module: str = "gateway.cli",
        initial_syncs: int | None = None,
    ):
        self.xds = (LOCAL, free_port())
        self.admin = (LOCAL, free_port())
        self.log = log
        args = ["control-plane", str(config), "--xds", host_port(self.xds)]
        # No endpoint probes by default: the simulated models have no servers, so every probe
        # fails (`--health-interval` turns them on, as a deployment has them).
        args += ["--admin", host_port(self.admin), "--health-interval", str(HEALTH_INTERVAL)]
        argv = [sys.executable, "-m", module, *args]
        if initial_syncs is not None:  # the bound of xds_server.INITIAL_SYNCS; env execs
            argv = ["env", f"INFERGATE_XDS_INITIAL_SYNCS={initial_syncs}", *argv]
        if PLANE_SOURCE is not None:
            argv = ["env", "-C", str(PLANE_SOURCE), f"PYTHONPATH={PLANE_SOURCE}", *argv]
        self.child = Child("control-plane", argv, str(log))

    @property
    def address(self) -> str:
        return host_port(self.xds)

    @property
    def pid(self) -> int:
        assert self.child.proc is not None
        return self.child.proc.pid

    def __enter__(self) -> PlaneProcess:
        """Start and wait for the admin API; the first build of 1,000 models takes long."""
        self.start()
        return self

    def start(self) -> None:
        self.child.start()
        try:
            wait_http(f"http://{host_port(self.admin)}/healthz", timeout=600, child=self.child)
        except BaseException:
            self.child.stop()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash: the clients' streams break without a goodbye."""
        self.child.stop(sig=signal.SIGKILL)

    def __exit__(self, *_: object) -> None:
        self.child.stop()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def builds(self) -> list[tuple[float, float]]:
        """(wall-clock time of the log line, build ms) of every snapshot published so far."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if m := APPLIED.match(line):
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((at, float(m.group(2))))
        return out
