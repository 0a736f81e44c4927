"""Mutual TLS between Envoy and the model servers: the files named by `upstream_tls`, the
SDS secrets made of them, and the client context of the control plane's own probes.

Envoy gets its client certificate and the CA of the model servers as two secrets over
ADS (SDS), which the clusters name (`translate.py`); a certificate rotated on disk becomes
a new version of the secrets, applied without a restart (docs/upstream-tls.md).
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import (
    CertificateValidationContext,
    TlsCertificate,
)
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

CLIENT_SECRET = "upstream-tls/client"  # Envoy's client certificate and key
CA_SECRET = "upstream-tls/ca"  # the CA that signed the model servers' certificates


@dataclass(frozen=True)
class UpstreamTls:
    """PEM files, absolute: Envoy's (and the control plane's) client certificate and key, the
    CA that signs the model servers' certificates and checks the clients', and the server
    certificate and key that model servers started by `infergate run` present."""

    cert: Path
    key: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def files(self) -> tuple[Path, ...]:
        return (self.cert, self.key, self.ca)

    def serve_options(self) -> tuple[str, ...]:
        """`infergate serve` options for a model server that accepts only the mesh."""
        return (
            *("--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)),
            *("--tls-client-ca", str(self.ca)),
        )


class TlsFileError(ValueError):
    """A file of `upstream_tls` is missing or unusable; `field` names its key."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Material:
    """The contents of the client certificate, its key and the CA (PEM bytes)."""

    cert: bytes
    key: bytes = field(repr=False)  # never in a log line
    ca: bytes

    def client_context(self) -> ssl.SSLContext:
        """A client context presenting this certificate and trusting only this CA. Like Envoy
        (no SAN matcher), it accepts any server certificate the CA signed. TlsFileError
        names the unusable file."""
        try:
            context = ssl.create_default_context(cadata=self.ca.decode(errors="replace"))
        except ssl.SSLError as exc:
            raise TlsFileError("ca", f"holds no PEM certificate{_why(exc)}") from None
        context.check_hostname = False
        with tempfile.TemporaryDirectory() as folder:  # ssl loads a key only from a file
            cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert.write_bytes(self.cert)
            key.touch(mode=0o600)
            key.write_bytes(self.key)
            _load_pair(context, cert, key, ("cert", "key"))
        return context


def _load_pair(context: ssl.SSLContext, cert: Path, key: Path, fields: tuple[str, str]) -> None:
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsFileError(fields[1], f"is not the key of the {fields[0]} file") from None
        why = f"is not a PEM certificate with its key{_why(exc)}"
        raise TlsFileError(fields[0], why) from None


def _why(exc: ssl.SSLError) -> str:
    return f" ({exc.reason})" if exc.reason else ""


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(field, f"cannot be read ({exc.strerror}: {path})") from None


def read(tls: UpstreamTls) -> Material:
    """The client files' contents, checked as one set (a rotation caught between writing
    the certificate and the key raises TlsFileError)."""
    material = Material(_read(tls.cert, "cert"), _read(tls.key, "key"), _read(tls.ca, "ca"))
    material.client_context()
    return material


def check(tls: UpstreamTls) -> None:
    """Raise TlsFileError for the first missing or unusable file, or a key that does not
    belong to its certificate."""
    read(tls)
    if (tls.server_cert, tls.server_key) != (tls.cert, tls.key):
        _read(tls.server_cert, "server_cert")
        _read(tls.server_key, "server_key")
        _load_pair(
            ssl.create_default_context(),
            tls.server_cert,
            tls.server_key,
            ("server_cert", "server_key"),
        )


def stat_key(tls: UpstreamTls) -> tuple:
    """Changes when any of the client files changes (mtime, size, inode)."""
    key = []
    for path in tls.files():
        try:
            st = path.stat()
            key.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            key.append(None)
    return tuple(key)


def secrets(material: Material) -> dict[str, Secret]:
    """The SDS secrets every Envoy gets: its client certificate, and the CA it trusts."""
    return {
        CLIENT_SECRET: Secret(
            name=CLIENT_SECRET,
            tls_certificate=TlsCertificate(
                certificate_chain=DataSource(inline_bytes=material.cert),
                private_key=DataSource(inline_bytes=material.key),
            ),
        ),
        CA_SECRET: Secret(
            name=CA_SECRET,
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(inline_bytes=material.ca)
            ),
        ),
    }
