"""`infergate run` with `upstream_tls`: the replicas it starts serve only the mesh (mutual
TLS with the file's CA), and Envoy reaches them with its SDS certificate, also through the
activator when a version scales from zero."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request

import pytest

from tests.certs import CertificateAuthority
from tests.stack import count_versions
from tests.test_scaling_zero import infer_waiting
from tests.test_supervisor_replicas import Run

TLS_RUN = """\
listen: 127.0.0.1:{{listen}}
upstream_tls: {{{{cert: envoy.crt, key: envoy.key, ca: ca.pem}}}}
models:
  iris:
    versions:
      v1: {v1}
"""
TLS_ONE = TLS_RUN.format(v1="{{replicas: 1}}")


def test_replicas_serve_mutual_tls_and_take_traffic_through_envoy(
    tmp_path, model_repository, envoy_binary
):
    ca = CertificateAuthority(tmp_path)
    shutil.copy(ca.path, tmp_path / "ca.pem")
    cert, key = ca.issue("envoy")
    with Run(tmp_path, model_repository, TLS_ONE) as run:
        run.wait("a ready replica", lambda: len(run.ready_addresses("v1")) == 1)
        run.wait("Envoy routes to it", lambda: run.healthy_hosts("v1") == run.ready_addresses("v1"))
        assert count_versions(run.listen, 20) == {"v1": 20}
        (address,) = run.ready_addresses("v1")
        url = f"https://{address}/v2/health/ready"
        context = ssl.create_default_context(cafile=ca.path)
        context.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=5, context=context)  # no client certificate
        context.load_cert_chain(cert, key)
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            assert resp.status == 200


TLS_FROM_ZERO = TLS_RUN.format(v1="{{autoscale: {{min: 0, max: 1, target_concurrency: 4}}}}")


def test_a_request_from_zero_goes_through_the_activator_over_mutual_tls(
    tmp_path, model_repository, envoy_binary
):
    ca = CertificateAuthority(tmp_path)
    shutil.copy(ca.path, tmp_path / "ca.pem")
    ca.issue("envoy")
    options = ("--activation-timeout", "30")
    with Run(tmp_path, model_repository, TLS_FROM_ZERO, *options) as run:
        run.wait("the activator in Envoy", lambda: len(run.healthy_hosts("v1")) == 1)
        assert run.replicas("v1") == []
        reply = infer_waiting(run.listen)
        assert reply.status == 200 and reply.version == "v1", reply.body[:300]
