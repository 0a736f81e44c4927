"""Addresses that are already in use: a clear error that names the process holding them.

The holder comes from psutil (the listening socket's owner), which reads the same
`/proc/net/tcp*` and `/proc/PID/fd` tables one would parse by hand, IPv6 included; it is
None when the owner belongs to another user that we may not inspect.
"""

from __future__ import annotations

import errno
import socket

_ANY = ("0.0.0.0", "::")


def holder(address: tuple[str, int]) -> str | None:
    """`pid N (command line)` of the process listening on `address`, if it can be known."""
    import psutil  # only once an address is taken: a model server starts without it

    host, port = address
    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and conn.laddr.ip.removeprefix("::ffff:") in (host, *_ANY)
            and conn.pid
        ):
            try:
                command = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                command = ""
            return f"pid {conn.pid} ({command[:120]})" if command else f"pid {conn.pid}"
    return None


class AddressInUse(OSError):
    """`what` (for example "xDS") cannot listen on `address`: another socket holds it."""

    def __init__(self, address: tuple[str, int], what: str):
        self.address = address
        owner = holder(address)
        by = f" by {owner}" if owner else ""
        super().__init__(
            errno.EADDRINUSE, f"{what} address {address[0]}:{address[1]} is already in use{by}"
        )

    def __str__(self) -> str:
        return self.strerror


def ensure_free(address: tuple[str, int], what: str) -> None:
    """Raise AddressInUse unless a listener could bind `address` now (without SO_REUSEPORT,
    so a port that another process shares through SO_REUSEPORT counts as taken)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(address, what) from None
            raise
