"""Start, watch and stop child processes; wait for a local HTTP endpoint to answer."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from gateway.logs import one_line

log = logging.getLogger("infergate.processes")

_PR_SET_PDEATHSIG = 1

FIRST_DELAY = 1.0  # seconds before the first restart
MAX_DELAY = 30.0  # the doubling stops here: a broken child costs little, a fixed one returns soon
STABLE_AFTER = 10.0  # a child that ran this long before exiting starts a new series


def restart_delay(failures: int) -> float:
    """Seconds before restarting a child that exited `failures` times in a row, quickly."""
    return min(MAX_DELAY, FIRST_DELAY * 2 ** (failures - 1))


def log_tail(log_path: str | None, lines: int = 3) -> str:
    """The last lines of a log file, as one line."""
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return one_line(" | ".join(tail), 400)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, and leave the parent's process group,
    so that Ctrl-C reaches the supervisor alone and it stops children in order."""
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def host_port(address: tuple[str, int]) -> str:
    """`host:port` text of an address pair."""
    return f"{address[0]}:{address[1]}"


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_FIRST_PORT = 10000
PORT_RANGE_ENV = "INFERGATE_PORT_RANGE"  # `LOW-HIGH`: where free_port picks (children inherit)
_handed_out: set[int] = set()


def port_range() -> tuple[int, int]:
    """[low, high) of the ports free_port picks: `$INFERGATE_PORT_RANGE` (e.g. one share per
    parallel test worker), else from 10000 up to the kernel's ephemeral range."""
    if given := os.environ.get(PORT_RANGE_ENV):
        low, high = given.split("-")
        return int(low), int(high)
    return _FIRST_PORT, _ephemeral_start()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, never one this process handed out before. It is picked
    below the kernel's ephemeral range, so the source port of an outgoing connection cannot
    take it between now and its bind (a CI run lost an OS-picked port that way: Envoy's
    listener bind NACKed with 'Address already in use')."""
    low, high = port_range()
    if high - low < 1000:  # an unusual range: let the OS pick
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    while True:
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


class Child:
    """One named child process."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str | None = None,
        ready_url: str | None = None,
        terminal: bool = False,
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.ready_url = ready_url  # answers 200 once the process serves
        self.terminal = terminal  # stderr goes to our stderr, not to the log file
        self.proc: subprocess.Popen | None = None

    def start(self) -> Child:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT if out and not self.terminal else None,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        finally:
            if out:
                out.close()
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process, wait up to `timeout`, then kill it. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def infergate_command(*args: str) -> list[str]:
    """argv that runs the `infergate` command line with this interpreter."""
    return [sys.executable, "-m", "gateway.cli", *args]


def model_server_child(
    repository: str,
    model: str,
    version: str | None,
    address: tuple[str, int],
    log_path: str,
    grpc_port: int | None = None,
    extra: tuple[str, ...] = (),
) -> Child:
    """An unstarted `infergate serve` for one model version (every version when None; serving
    the gRPC API too when `grpc_port` is given; `extra`: more `serve` options), ready once it
    reports ready."""
    host, port = address
    options = ["--model", model, "--host", host, "--port", str(port)]
    if version is not None:
        options += ["--version", version]
    if grpc_port is not None:
        options += ["--grpc-port", str(grpc_port)]
    options += extra
    argv = infergate_command("serve", "--repository", repository, *options)
    ready = f"http://{host}:{port}/v2/health/ready"
    return Child(f"model {model}/{version} @{host}:{port}", argv, log_path, ready_url=ready)


def wait_http(
    url: str,
    timeout: float = 60.0,
    child: Child | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Wait until `url` answers 200 (https: with this client `context`); fail early if
    `child` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        if child is not None and not child.running:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s: {last}")
