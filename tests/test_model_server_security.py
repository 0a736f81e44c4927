"""Who may reach a model server: the admin token on repository load/unload (REST and gRPC),
and TLS with client certificates (`infergate serve --tls-cert --tls-key --tls-client-ca`).

The TLS server runs as `infergate serve` in a subprocess (it also serves gRPC, whose stubs
cannot share a process with tritonclient's)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest

from gateway.cli import main
from gateway.processes import free_port, infergate_command
from model_servers.admin import AdminGuard
from model_servers.answers import AnswerLog
from model_servers.protocol import ProtocolError
from model_servers.repository import load_model
from tests.app_client import app_client
from tests.certs import CertificateAuthority

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-admin-token"
BODY = {
    "inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}


# --- the admin guard -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_without_a_token_admin_calls_are_open_on_loopback(host: str) -> None:
    AdminGuard(host).check(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "models.internal"])
def test_without_a_token_admin_calls_are_refused_beyond_loopback(host: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        AdminGuard(host).check(f"Bearer {TOKEN}")
    assert refused.value.status == 403
    assert host in refused.value.message and "--admin-token-file" in refused.value.message


@pytest.mark.parametrize("authorization", [None, "", "Bearer wrong", TOKEN, f"Basic {TOKEN}"])
def test_with_a_token_admin_calls_need_it(authorization: str | None) -> None:
    guard = AdminGuard("0.0.0.0", TOKEN)
    guard.check(f"Bearer {TOKEN}")
    with pytest.raises(ProtocolError) as refused:
        guard.check(authorization)
    assert refused.value.status == 401


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v2/repository/models/iris/load"),
        ("POST", "/v2/repository/models/iris/versions/v1/unload"),
        ("GET", "/v2/answers"),
    ],
)
async def test_rest_admin_calls_beyond_loopback_without_a_token_get_403(
    repo: Path, method: str, path: str
) -> None:
    client = await app_client(
        load_model(repo, "iris", "v1"),
        repository=repo,
        answers=AnswerLog(10),
        admin=AdminGuard("0.0.0.0"),
    )
    try:
        resp = await client.request(method, path)
        assert resp.status == 403
        assert "--admin-token-file" in (await resp.json())["error"]
        assert (await client.get("/v2/models/iris/ready")).status == 200  # still served
    finally:
        await client.close()


# --- a TLS server with a client CA and an admin token ----------------------------------


class Certs(NamedTuple):
    ca: Path
    client: tuple[Path, Path]
    foreign: tuple[Path, Path]  # signed by another CA


class Server(NamedTuple):
    port: int
    grpc_port: int
    certs: Certs


def tls_context(certs: Certs, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if client is not None:
        context.load_cert_chain(*client)
    return context


def rest(server: Server, path: str, client: tuple[Path, Path] | None, **request) -> tuple:
    """(status, JSON body) of one HTTPS call presenting `client` (cert, key) or nothing."""
    url = f"https://localhost:{server.port}{path}"
    req = urllib.request.Request(url, **request)
    context = tls_context(server.certs, client)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(folder)
    server_cert, server_key = ca.issue("server")
    certs = Certs(ca.path, ca.issue("client"), CertificateAuthority(folder, "other CA").issue("x"))
    (folder / "token").write_text(TOKEN + "\n")
    port, grpc_port = free_port(), free_port()
    argv = infergate_command(
        "serve",
        *("--repository", str(repo), "--model", "iris", "--version", "v1"),
        *("--port", str(port), "--grpc-port", str(grpc_port)),
        *("--tls-cert", str(server_cert), "--tls-key", str(server_key)),
        *("--tls-client-ca", str(ca.path), "--admin-token-file", str(folder / "token")),
    )
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    running = Server(port, grpc_port, certs)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start: " + log.read_text()
            try:
                if rest(running, "/v2/health/ready", certs.client)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield running
    finally:
        proc.terminate()
        proc.wait(30)


def test_rest_with_a_client_certificate_from_the_ca_works(server: Server) -> None:
    data = json.dumps(BODY).encode()
    status, body = rest(server, "/v2/models/iris/infer", server.certs.client, data=data)
    assert status == 200 and body["outputs"][0]["data"] == [0]


@pytest.mark.parametrize("who", ["no certificate", "foreign CA"])
def test_rest_without_a_certificate_from_the_ca_is_refused(server: Server, who: str) -> None:
    client = None if who == "no certificate" else server.certs.foreign
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        rest(server, "/v2/health/ready", client)


def test_plain_http_is_refused(server: Server) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v2/health/ready", timeout=10)


def test_rest_repository_changes_need_the_admin_token(server: Server) -> None:
    path, client = "/v2/repository/models/iris/versions/v1/load", server.certs.client
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = rest(server, path, client, method="POST", headers=headers)
        assert status == 401 and "Bearer" in body["error"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status, body = rest(server, path, client, method="POST", headers=headers)
    assert status == 200 and body == {"name": "iris", "versions": ["v1"], "state": "READY"}


def grpc_client(server: Server, client: tuple[Path, Path] | None):
    cert, key = client or (None, None)
    return grpcclient.InferenceServerClient(
        f"localhost:{server.grpc_port}",
        ssl=True,
        root_certificates=str(server.certs.ca),
        private_key=key and str(key),
        certificate_chain=cert and str(cert),
    )


def grpc_infer(client) -> list[int]:
    tensor = grpcclient.InferInput("x", [1, 4], "FP64")
    tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
    return client.infer("iris", [tensor]).as_numpy("predict").tolist()


def test_grpc_with_a_client_certificate_from_the_ca_works(server: Server) -> None:
    with grpc_client(server, server.certs.client) as client:
        assert grpc_infer(client) == [0]


@pytest.mark.parametrize("who", ["no certificate", "foreign CA"])
def test_grpc_without_a_certificate_from_the_ca_is_refused(server: Server, who: str) -> None:
    certificate = None if who == "no certificate" else server.certs.foreign
    with grpc_client(server, certificate) as client:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(client)
        assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_grpc_repository_changes_need_the_admin_token(server: Server) -> None:
    with grpc_client(server, server.certs.client) as client:
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                client.unload_model("iris", headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            assert client.is_model_ready("iris")
        bearer = {"authorization": f"Bearer {TOKEN}"}
        client.unload_model("iris", headers=bearer)
        with pytest.raises(InferenceServerException):
            client.is_model_ready("iris")  # NOT_FOUND: unloaded
        client.load_model("iris", headers=bearer)  # every version: v1-v3
        assert client.is_model_ready("iris", "v3")
        # one version: parameter "version" (tritonclient's load_model cannot send it)
        cert, key = server.certs.client
        credentials = grpc.ssl_channel_credentials(
            server.certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        with grpc.secure_channel(f"localhost:{server.grpc_port}", credentials) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            version = {"version": service_pb2.ModelRepositoryParameter(string_param="v3")}
            unload = service_pb2.RepositoryModelUnloadRequest(model_name="iris", parameters=version)
            stub.RepositoryModelUnload(unload, metadata=list(bearer.items()))
        assert client.is_model_ready("iris", "v1")
        with pytest.raises(InferenceServerException):
            client.is_model_ready("iris", "v3")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tls-client-ca", "ca.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--record-answers", "10", "--processes", "2"], "--record-answers needs --processes 1"),
        (["--record-answers", "-1"], "--record-answers must be >= 0"),
        (["--record-answers-max-mib", "0"], "--record-answers-max-mib >= 1"),
    ],
)
def test_serve_refuses_incomplete_options(options: list[str], message: str, capsys) -> None:
    assert main(["serve", "--repository", "unused", *options]) == 2
    assert message in capsys.readouterr().err
