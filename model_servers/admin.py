"""Who may call a model server's admin endpoints (repository load/unload, recorded answers),
and the TLS settings of its listeners."""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from model_servers.protocol import ProtocolError


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address) is reachable only from this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class AdminGuard:
    """With a token, admin calls need `Authorization: Bearer <token>`. Without one they are
    open on a loopback listener and refused (403) on any other."""

    host: str = "127.0.0.1"
    token: str | None = None

    def check(self, authorization: str | None) -> None:
        """Raise ProtocolError 401 (wrong or missing token) or 403 (no token configured)."""
        if self.token is None:
            if is_loopback(self.host):
                return
            raise ProtocolError(
                403,
                f"admin endpoints are disabled: this server listens on {self.host}, beyond "
                "loopback, without an admin token (start it with --admin-token-file)",
            )
        expected = f"Bearer {self.token}".encode()
        if not hmac.compare_digest((authorization or "").encode(), expected):
            raise ProtocolError(401, "admin endpoints need 'Authorization: Bearer <admin token>'")


OPEN_ON_LOOPBACK = AdminGuard()


@dataclass(frozen=True)
class ServerTls:
    """PEM files: the server's certificate and key, and the CA whose client certificates
    are the only ones accepted (None: no client certificate is asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
