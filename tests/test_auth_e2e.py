"""Identity and access through a real Envoy: API keys, JWTs, 401/403, the consumer header,
the one error shape, server metadata and hot reload of the keys file (one Envoy for all)."""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import tritonclient.http as triton
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from control_plane.translate_auth import CONSUMER_HEADER
from gateway.processes import free_port
from tests.stack import IRIS_BODY, Stack

ISSUER = "https://idp.test"


class Echo(BaseHTTPRequestHandler):
    """An upstream that answers every request with the headers it received."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


class Idp:
    """A JWT issuer: an RSA key, its JWKS, and tokens."""

    def __init__(self, kid: str = "k1") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid

    def jwk(self) -> dict[str, str]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def jwks(self) -> str:
        return json.dumps({"keys": [self.jwk()]})

    def token(self, sub: str = "carol", **claims) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "infergate", "sub": sub, "iat": now, "exp": now + 600}
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid})


ROUTING = """\
listen: 127.0.0.1:{listen}
consumers:
  keys_file: api-keys.yaml
  jwt: {{issuer: "{issuer}", audiences: [infergate], jwks_file: jwks.json}}
  priority: {{bob: low}}
models:
  iris:
    versions: {{v1: {{endpoints: [127.0.0.1:{iris}]}}}}
    access: {{consumers: [alice, carol]}}
  echo:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
  pub:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
    access: {{public: true}}
  down:
    versions: {{v1: {{endpoints: [127.0.0.1:{down}]}}}}
"""


class AuthStack:
    def __init__(self, stack: Stack, echo: int) -> None:
        self.stack = stack
        self.idp = Idp()
        self.keys = {"alice": secrets.token_urlsafe(24), "bob": secrets.token_urlsafe(24)}
        self.keys_file = stack.workdir / "api-keys.yaml"
        self.echo = echo

    def write_keys(self, keys: dict[str, str] | str) -> None:
        text = keys if isinstance(keys, str) else "".join(f"{c}: {k}\n" for c, k in keys.items())
        tmp = self.keys_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.keys_file)

    def request(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.stack.listen, timeout=10)
        try:
            method = "POST" if path.endswith("/infer") else "GET"
            body = IRIS_BODY if method == "POST" else None
            conn.request(
                method, path, body, {"content-type": "application/json", **(headers or {})}
            )
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            if own:
                conn.close()

    def status(self, path: str, **headers: str) -> int:
        return self.request(path, headers)[0]

    def bearer(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def auth(tmp_path_factory, model_repository, envoy_binary) -> Iterator[AuthStack]:
    echo_server = ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=echo_server.serve_forever, daemon=True).start()
    stack = Stack(tmp_path_factory.mktemp("auth"), model_repository, replicas={"v1": 1})
    a = AuthStack(stack, echo_server.server_address[1])
    try:
        stack.start_models()
        a.write_keys(a.keys)
        (stack.workdir / "jwks.json").write_text(a.idp.jwks())
        stack.write(
            ROUTING.format(
                listen=stack.listen,
                issuer=ISSUER,
                iris=stack.model_ports["v1"][0],
                echo=a.echo,
                down=free_port(),  # nothing listens there
            )
        )
        stack.start_control_plane()
        stack.start_envoy()
        stack.wait_converged()
        yield a
    finally:
        stack.stop()
        echo_server.shutdown()


def error_of(reply: tuple[int, dict[str, str], bytes]) -> str:
    """The message of an `{"error": ...}` answer (asserting that shape)."""
    _, headers, body = reply
    assert headers["content-type"] == "application/json", headers
    document = json.loads(body)
    assert set(document) == {"error"} and document["error"], document
    return document["error"]


def test_api_keys_401_403_and_the_consumer_header(auth: AuthStack):
    alice, bob = auth.keys["alice"], auth.keys["bob"]
    assert auth.status("/v2/models/iris/infer", authorization=f"Bearer {alice}") == 200
    assert auth.status("/v2/models/iris/infer", **{"x-api-key": alice}) == 200
    missing = auth.request("/v2/models/iris/infer")
    assert missing[0] == 401 and error_of(missing)
    wrong = auth.request("/v2/models/iris/infer", {"x-api-key": secrets.token_urlsafe(24)})
    assert wrong[0] == 401 and error_of(wrong)
    forbidden = auth.request("/v2/models/iris/infer", auth.bearer(bob))
    assert forbidden[0] == 403 and error_of(forbidden)
    # A model without `access` takes any valid consumer; the header names who it is, never
    # what the client claimed, and the key goes no further than Envoy.
    status, _, body = auth.request(
        "/v2/models/echo/infer", {"x-api-key": bob, CONSUMER_HEADER: "alice"}
    )
    seen = json.loads(body)
    assert status == 200 and seen[CONSUMER_HEADER] == "bob"
    assert "x-api-key" not in seen and bob not in body.decode()
    assert auth.status("/v2/models/echo/infer") == 401


def test_open_routes_need_no_credential_and_errors_have_one_shape(auth: AuthStack):
    status, _, body = auth.request("/v2/models/pub/infer", {CONSUMER_HEADER: "alice"})
    assert status == 200 and CONSUMER_HEADER not in json.loads(body)
    assert auth.status("/v2/health/ready") == 200
    assert json.loads(auth.request("/v2/health/live")[2]) == {"live": True}
    for path in ("/v2/nothing-here", "/v2/models/unknown/infer"):
        reply = auth.request(path, {"x-api-key": auth.keys["alice"]})
        assert reply[0] == 404 and "no model" in error_of(reply)
        assert auth.request(path)[0] == 404
    down = auth.request("/v2/models/down/infer", {"x-api-key": auth.keys["alice"]})
    assert down[0] == 503 and error_of(down)


def test_jwt(auth: AuthStack):
    idp = auth.idp
    status, _, body = auth.request("/v2/models/echo/infer", auth.bearer(idp.token()))
    assert status == 200 and json.loads(body)[CONSUMER_HEADER] == "carol"
    assert "authorization" not in json.loads(body)
    assert auth.status("/v2/models/iris/infer", **auth.bearer(idp.token())) == 200
    assert auth.status("/v2/models/iris/infer", **auth.bearer(idp.token("dave"))) == 403
    now = int(time.time())
    rejected = {  # an invalid credential is 401, whatever makes it invalid
        "expired": idp.token(exp=now - 120, iat=now - 900),
        "wrong issuer": idp.token(iss="https://evil.test"),
        "wrong signature": Idp().token(),
        "wrong audience": idp.token(aud="someone-else"),
    }
    for what, token in rejected.items():
        for model in ("iris", "echo"):
            reply = auth.request(f"/v2/models/{model}/infer", auth.bearer(token))
            assert reply[0] == 401, what
            assert error_of(reply) != "RBAC: access denied", what
    assert "Audiences" in error_of(
        auth.request("/v2/models/echo/infer", auth.bearer(rejected["wrong audience"]))
    )


def test_server_metadata_through_the_gateway(auth: AuthStack):
    client = triton.InferenceServerClient(f"127.0.0.1:{auth.stack.listen}")
    try:
        metadata = client.get_server_metadata()
    finally:
        client.close()
    assert metadata["name"] == "infergate" and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_revoked_key_stops_while_others_keep_working(auth: AuthStack):
    """Bob's key is revoked by an edit while alice and bob send requests on kept-alive
    connections: bob gets 401 on his open connection, alice never fails."""
    stop = threading.Event()
    results: dict[str, list[tuple[float, int]]] = {"alice": [], "bob": []}

    def send(consumer: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", auth.stack.listen, timeout=10)
        headers = {"x-api-key": auth.keys[consumer]}
        while not stop.is_set():
            status = auth.request("/v2/models/echo/infer", headers, conn)[0]
            results[consumer].append((time.monotonic(), status))
        conn.close()

    workers = [threading.Thread(target=send, args=(c,)) for c in ("alice", "bob")]
    for w in workers:
        w.start()
    try:
        while len(results["bob"]) < 20:
            time.sleep(0.01)
        revoked_at = time.monotonic()
        auth.write_keys({"alice": auth.keys["alice"]})
        deadline = time.monotonic() + 10
        while not any(s == 401 for _, s in results["bob"]):
            assert time.monotonic() < deadline, "bob's key still works"
            time.sleep(0.01)
        took = min(t for t, s in results["bob"] if s == 401) - revoked_at
        count = len(results["alice"])
        while len(results["alice"]) < count + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        auth.write_keys(auth.keys)
    print(f"revoked key refused {took * 1000:.0f} ms after the edit")
    assert {s for _, s in results["alice"]} == {200}
    first_401 = next(i for i, (_, s) in enumerate(results["bob"]) if s == 401)
    assert {s for _, s in results["bob"][first_401:]} == {401}
    deadline = time.monotonic() + 10
    while auth.status("/v2/models/echo/infer", **{"x-api-key": auth.keys["bob"]}) != 200:
        assert time.monotonic() < deadline, "bob's key was not restored"
        time.sleep(0.02)


def test_bad_keys_file_is_rejected_and_the_last_good_keys_serve(auth: AuthStack):
    alice = auth.keys["alice"]
    bad = f"alice: {alice}\nbob: short.key\n"
    auth.write_keys(bad)
    deadline = time.monotonic() + 10
    while not (error := auth.stack.status()["config"]["error"]):
        assert time.monotonic() < deadline, "the bad keys file was not reported"
        time.sleep(0.05)
    assert f"{auth.keys_file}:2:6:" in error["message"], error
    assert "short.key" not in json.dumps(error)
    assert auth.status("/v2/models/iris/infer", **{"x-api-key": alice}) == 200
    assert auth.status("/v2/models/echo/infer", **{"x-api-key": auth.keys["bob"]}) == 200
    auth.write_keys(auth.keys)
    while auth.stack.status()["config"]["error"]:
        assert time.monotonic() < deadline + 10, "the good keys file was not taken back"
        time.sleep(0.05)


def test_no_key_in_logs_or_status(auth: AuthStack):
    text = json.dumps(auth.stack.status())
    text += "".join(p.read_text(errors="replace") for p in Path(auth.stack.workdir).glob("*.log"))
    for key in auth.keys.values():
        assert key not in text


def test_jwks_rotation_applies_without_a_restart(auth: AuthStack):
    """A new JWKS (the issuer rotated its key): tokens of the new key work, those of the old
    key stop. (A JWKS edit is a listener update, which drains connections: unlike a keys
    edit it may reset a request that races a connection's close, docs/api-management.md.)"""
    old, new = auth.idp, Idp()
    jwks = auth.stack.workdir / "jwks.json"
    try:
        tmp = jwks.with_suffix(".tmp")
        tmp.write_text(new.jwks())
        tmp.replace(jwks)
        deadline = time.monotonic() + 20
        while auth.status("/v2/models/echo/infer", **auth.bearer(new.token())) != 200:
            assert time.monotonic() < deadline, "the new JWKS was not applied"
            time.sleep(0.05)
        assert auth.status("/v2/models/echo/infer", **auth.bearer(old.token())) == 401
    finally:
        jwks.write_text(old.jwks())


def test_keys_without_jwt(auth: AuthStack):
    """Without `jwt` (no JWT filter in the chain) Envoy takes the config and keys work;
    a bearer JWT is then an unknown key (it once skipped every check on `echo`). Runs last:
    it drops `jwt` for the module's stack."""
    routing = auth.stack.config.read_text()
    started = time.time()
    without_jwt = routing.replace("  jwt: {", "  # jwt: {").replace("alice, carol", "alice")
    auth.stack.write(without_jwt)
    auth.stack.wait_converged(after=started)
    assert auth.status("/v2/models/iris/infer", **{"x-api-key": auth.keys["alice"]}) == 200
    for model in ("iris", "echo"):
        assert auth.status(f"/v2/models/{model}/infer", **auth.bearer(auth.idp.token())) == 401
    assert auth.status("/v2/models/pub/infer") == 200
    assert auth.status("/v2/health/ready") == 200
