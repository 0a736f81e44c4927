"""Mutual TLS between Envoy and the model servers (`upstream_tls`), with the real Envoy:
model servers accept only clients whose certificate the CA signed; Envoy gets its client
certificate over SDS, passes its health checks and serves calls (SotW and Delta); a
certificate rotated on disk is pushed as a new secret version with no failed request."""

from __future__ import annotations

import base64
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from gateway import observe
from gateway.processes import Child, wait_http
from tests.certs import CertificateAuthority
from tests.stack import LoadLoop, Stack, count_versions, routing_yaml
from tests.test_grpc_gateway import versions

UPSTREAM_TLS = "upstream_tls: {cert: envoy.crt, key: envoy.key, ca: ca.pem}\n"


class TlsStack(Stack):
    """The test stack with model servers that require a client certificate from `ca`."""

    def __init__(self, workdir: Path, repository: Path, delta: bool):
        self.ca = CertificateAuthority(workdir)
        (workdir / "ca.pem").write_bytes(self.ca.path.read_bytes())
        self.ca.issue("envoy")
        server_cert, server_key = self.ca.issue("server")
        options = ("--tls-cert", str(server_cert), "--tls-key", str(server_key))
        options += ("--tls-client-ca", str(workdir / "ca.pem"))
        replicas = {"v1": 1, "v2": 1}
        super().__init__(workdir, repository, delta, replicas, grpc=True, model_options=options)

    def client(self, certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca.path)
        context.check_hostname = False
        if certificate:
            context.load_cert_chain(self.workdir / "envoy.crt", self.workdir / "envoy.key")
        return context

    def ready(self, port: int, context: ssl.SSLContext) -> int:
        url = f"https://127.0.0.1:{port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            return resp.status

    def wait_model_ready(self, port: int, child: Child) -> None:
        url = f"https://127.0.0.1:{port}/v2/health/ready"
        wait_http(url, child=child, context=self.client())

    def route(self, traffic: dict[str, int], shadow=None) -> str:
        text = routing_yaml(
            self.listen, self.model_ports, traffic, shadow, UPSTREAM_TLS, grpc=self.grpc
        )
        self.write(text)
        return text


@pytest.fixture(scope="module", params=["sotw", "delta"])
def tls_stack(request, tmp_path_factory, model_repository, envoy_binary):
    s = TlsStack(tmp_path_factory.mktemp("mtls"), model_repository, request.param == "delta")
    try:
        s.start_all({"v1": 50, "v2": 50})
        yield s
    finally:
        s.stop()


def client_secret(stack: Stack) -> tuple[str, int]:
    """The version and certificate serial of the client certificate Envoy runs."""
    dump = observe.config_dump(stack.envoy_url, "dynamic_active_secrets")["configs"]
    secret = next(c for c in dump if c["name"] == "upstream-tls/client")
    chain = secret["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
    return secret["version_info"], x509.load_pem_x509_certificate(
        base64.b64decode(chain)
    ).serial_number


def test_a_direct_call_without_a_client_certificate_is_refused(tls_stack):
    port = tls_stack.model_ports["v1"][0]
    assert tls_stack.ready(port, tls_stack.client()) == 200  # the mesh's certificate works
    with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
        tls_stack.ready(port, tls_stack.client(certificate=False))
    with pytest.raises((ConnectionResetError, urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)


def test_calls_through_the_gateway_work_over_mutual_tls(tls_stack):
    seen = count_versions(tls_stack.listen, 100)
    assert set(seen) == {"v1", "v2"}, seen  # no failed request (None)
    for version in ("v1", "v2"):
        assert tls_stack.envoy_stat(f"cluster.iris/{version}.ssl.handshake") > 0
        host = observe.hosts(tls_stack.envoy_url, f"iris/{version}")
        assert all(not h["health"] for h in host.values()), host  # health checks pass
    versions = tls_stack.status()["versions"]  # the control plane's probes pass too
    assert all(v["http"]["healthy"] == v["http"]["total"] == 1 for v in versions), versions


def test_grpc_calls_through_the_gateway_work_over_mutual_tls(tls_stack):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{tls_stack.grpc[0]}")
    try:
        assert set(versions(client, grpcclient, 40)) == {"v1", "v2"}
    finally:
        client.close()
    assert tls_stack.envoy_stat("cluster.iris/v1/grpc.ssl.handshake") > 0


def test_a_certificate_rotated_on_disk_applies_under_load_with_no_failed_request(tls_stack):
    version, serial = client_secret(tls_stack)
    with LoadLoop(tls_stack.listen) as load:
        load.wait_results(100)
        new_cert, new_key = tls_stack.ca.issue("rotated")
        # Certificate first, key after: the control plane sees a mismatched pair for a
        # moment and keeps the last good one.
        new_cert.replace(tls_stack.workdir / "envoy.crt")
        time.sleep(0.3)
        new_key.replace(tls_stack.workdir / "envoy.key")
        deadline = time.monotonic() + 20
        while client_secret(tls_stack)[1] == serial:
            assert time.monotonic() < deadline, "Envoy still runs the old client certificate"
            time.sleep(0.05)
        load.wait_results(100)
    assert load.failures() == [], load.failures()[:5]
    new_version, new_serial = client_secret(tls_stack)
    assert new_version != version
    rotated = x509.load_pem_x509_certificate((tls_stack.workdir / "envoy.crt").read_bytes())
    assert new_serial == rotated.serial_number
