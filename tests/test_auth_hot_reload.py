"""API-management edits under traffic, through a real Envoy (SotW and Delta): JWKS and rate
edits change only the filter configs that Envoy takes by ECDS, and adding or removing
consumers, limits and priorities changes routes and those configs, never the listener; so no
connection is drained and no request of a caller whose access did not change fails
(docs/api-management.md)."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from control_plane.translate_auth import JWT
from control_plane.translate_limits import RATE_FILTER
from gateway.processes import free_port
from tests.stack import Stack, poll
from tests.test_auth_e2e import ISSUER, Echo, Idp

ROUTING = """\
listen: 127.0.0.1:{listen}
consumers:
  keys_file: api-keys.yaml
  jwt: {{issuer: "{issuer}", audiences: [infergate], jwks_file: jwks.json}}
models:
  echo:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
  metered:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
    limits: {{rate: {{per_consumer: 1/m, burst: {burst}}}}}
"""


def jwks(*idps: Idp) -> str:
    """One JWKS holding the keys of `idps`."""
    return json.dumps({"keys": [idp.jwk() for idp in idps]})


class Caller(threading.Thread):
    """Back-to-back requests on one kept-alive connection; any answer but 200, or an error
    (a reset), is a failure. Reconnects after an error, as a client would."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.port, self.headers = port, headers
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/v2/models/echo/ready", headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()


def _more_answers(callers: list[Caller], n: int) -> None:
    """Wait until each caller has had `n` more answers."""
    goal = [c.ok + n for c in callers]
    deadline = time.monotonic() + 30
    while any(c.ok < g for c, g in zip(callers, goal, strict=True)):
        assert time.monotonic() < deadline, [c.failures[-3:] for c in callers]
        time.sleep(0.01)


@contextlib.contextmanager
def kept_alive_callers(port: int, *headers: dict[str, str]) -> Iterator[list[Caller]]:
    """Callers sending back to back on kept-alive connections around the block (20 answers
    each before it and 20 after it); none may fail."""
    callers = [Caller(port, h) for h in headers]
    for c in callers:
        c.start()
    try:
        _more_answers(callers, 20)
        yield callers
        _more_answers(callers, 20)
    finally:
        for c in callers:
            c.stop.set()
        for c in callers:
            c.join(15)
    for c in callers:
        assert c.failures == [], c.failures


class Gateway:
    def __init__(self, stack: Stack, echo: int) -> None:
        self.stack, self.echo = stack, echo
        self.issuer, self.rotated = Idp(), Idp(kid="k2")
        self.keys = {"alice": secrets.token_urlsafe(24), "bob": secrets.token_urlsafe(24)}

    def write(self, name: str, text: str) -> None:
        tmp = self.stack.workdir / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.stack.workdir / name)

    def route(self, burst: int) -> None:
        self.stack.write(
            ROUTING.format(listen=self.stack.listen, issuer=ISSUER, echo=self.echo, burst=burst)
        )

    def status(self, path: str, headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.listen, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def metered(self) -> int:
        return self.status("/v2/models/metered/ready", {"x-api-key": self.keys["bob"]})

    def listener_updates(self) -> dict[str, int]:
        """Envoy's counters of listener changes: any listener update drains connections."""
        names = ("listener_added", "listener_modified", "listener_in_place_updated")
        counters = {n: self.stack.envoy_stat(f"listener_manager.{n}") for n in names}
        counters["draining"] = self.stack.envoy_stat("listener_manager.total_listeners_draining")
        return counters

    def reloads(self, name: str) -> int:
        """How often Envoy applied a new config of the ECDS filter `name`."""
        return self.stack.envoy_stat(f"extension_config_discovery.http_filter.{name}.config_reload")


def gateway_fixture(first_file: Callable[[Gateway], None]):
    """A module fixture, in SotW and Delta: a stack in front of an echo server, the keys
    file written, started on the file that `first_file` writes."""

    @pytest.fixture(scope="module", params=["sotw", "delta"])
    def fixture(request, tmp_path_factory, model_repository, envoy_binary) -> Iterator[Gateway]:
        workdir = tmp_path_factory.mktemp(first_file.__name__.strip("_"))
        with running_gateway(workdir, model_repository, request.param == "delta", first_file) as g:
            yield g

    return fixture


@contextlib.contextmanager
def running_gateway(
    workdir: Path, model_repository: Path, delta: bool, first_file: Callable[[Gateway], None]
) -> Iterator[Gateway]:
    http_server = ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    stack = Stack(workdir, model_repository, delta)
    g = Gateway(stack, http_server.server_address[1])
    try:
        first_file(g)
        g.write("api-keys.yaml", "".join(f"{c}: {k}\n" for c, k in g.keys.items()))
        stack.start_control_plane()
        stack.start_envoy()
        stack.wait_converged()
        yield g
    finally:
        stack.stop()
        http_server.shutdown()


def _with_jwks(g: Gateway) -> None:
    g.write("jwks.json", jwks(g.issuer))
    g.route(burst=2)


gateway = gateway_fixture(_with_jwks)


def test_jwks_and_rate_edits_under_traffic(gateway: Gateway):
    g = gateway
    assert [g.metered() for _ in range(3)] == [200, 200, 429]  # bob's bucket: 2, then empty
    with kept_alive_callers(
        g.stack.listen,
        {"x-api-key": g.keys["alice"]},
        {"authorization": f"Bearer {g.issuer.token()}"},
    ):
        before = g.listener_updates()
        lds = g.stack.status()["snapshot"]["types"]["lds"]

        # The issuer adds a key: its tokens work at once, the old key's keep working.
        reloads = g.reloads(JWT)
        started = time.time()
        g.write("jwks.json", jwks(g.issuer, g.rotated))
        # polled: another publish after `started` can converge before the file is read
        poll(lambda: g.reloads(JWT) > reloads, what="the JWT filter's reload")
        g.stack.wait_converged(after=started)
        rotated = {"authorization": f"Bearer {g.rotated.token()}"}
        assert g.status("/v2/models/echo/ready", rotated) == 200
        # The rate filter's config did not change: bob's bucket is still empty.
        assert g.metered() == 429

        # A rate edit: bob's new burst of 5 applies (the new config starts full buckets).
        reloads = g.reloads(RATE_FILTER)
        started = time.time()
        g.route(burst=5)
        poll(lambda: g.reloads(RATE_FILTER) > reloads, what="the rate filter's reload")  # as above
        g.stack.wait_converged(after=started)
        assert [g.metered() for _ in range(6)] == [200] * 5 + [429]

    assert g.listener_updates() == before, "a listener update drains connections"
    assert g.stack.status()["snapshot"]["types"]["lds"] == lds


PLAIN = """\
listen: 127.0.0.1:{listen}
models:
  echo:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
  metered:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
  counted:
    versions: {{v1: {{endpoints: [127.0.0.1:{echo}]}}}}
"""
CONSUMERS = "consumers:\n  keys_file: api-keys.yaml\n"
LOW = "  priority: {carol: low}\n"
QUOTA_SERVICE = "quota_service: {on_failure: closed}\n"


def managed(plain: str, rate: bool, max_body: bool, low: bool, quota: bool) -> str:
    """`plain` with consumers and the chosen limits (on `metered`; the quota on `counted`)."""
    text = plain.replace("models:\n", CONSUMERS + (LOW if low else "") + "models:\n")
    metered = [*(["rate: {per_consumer: 1/m, burst: 2}"] if rate else [])]
    metered += ["max_body: 100"] if max_body else []
    for model, limits in (("metered", metered), ("counted", ["quota: {per_consumer: 2/h}"])):
        if limits and (model == "metered" or quota):
            block = f"    limits: {{{', '.join(limits)}}}\n"
            text = text.replace(f"  {model}:\n", f"  {model}:\n{block}")
    return (QUOTA_SERVICE if quota else "") + text


def chunked(port: int, path: str, size: int, headers: dict[str, str]) -> int:
    """The status of a POST of `size` bytes sent chunked (no content-length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=iter([b"x" * size]), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _plain(g: Gateway) -> None:
    """A file without `consumers` and `limits`, and a keys file ready."""
    g.keys["carol"] = secrets.token_urlsafe(24)
    g.stack.write(PLAIN.format(listen=g.stack.listen, echo=g.echo))


plain = gateway_fixture(_plain)


def test_api_management_edits_change_no_listener(plain: Gateway):
    """From a file without consumers and limits: consumers and keys, a first rate, a
    max_body, a low priority consumer and a quota are added, then all removed again, while
    two callers whose access never changes (valid keys of `echo`, which has no `access`:
    open to all, then open to every valid consumer) send back to back on kept-alive
    connections. Every edit takes effect, no request fails, no listener changes."""
    g = plain
    bob = {"x-api-key": g.keys["bob"]}
    plain_file = PLAIN.format(listen=g.stack.listen, echo=g.echo)

    def edit(**limits: bool) -> None:
        started = time.time()
        g.stack.write(managed(plain_file, **limits) if limits else plain_file)
        g.stack.wait_converged(after=started)

    with kept_alive_callers(
        g.stack.listen,
        {"x-api-key": g.keys["alice"]},
        {"authorization": f"Bearer {g.keys['carol']}"},
    ):
        before = g.listener_updates()
        assert g.status("/v2/models/metered/ready", {}) == 200  # open to all

        edit(rate=False, max_body=False, low=False, quota=False)
        assert g.status("/v2/models/metered/ready", {}) == 401
        assert g.metered() == 200

        edit(rate=True, max_body=False, low=False, quota=False)
        assert [g.metered() for _ in range(3)] == [200, 200, 429]

        edit(rate=True, max_body=True, low=False, quota=False)
        assert chunked(g.stack.listen, "/v2/models/metered/infer", 101, bob) == 413

        edit(rate=True, max_body=True, low=True, quota=False)
        carol = {"x-api-key": g.keys["carol"]}
        assert g.status("/v2/models/counted/ready", carol) == 200  # on carol's twin route

        edit(rate=True, max_body=True, low=True, quota=True)
        assert [g.status("/v2/models/counted/ready", bob) for _ in range(3)] == [200, 200, 429]

        edit()
        assert g.status("/v2/models/metered/ready", {}) == 200  # open to all again
        assert g.status("/v2/models/counted/ready", {}) == 200
        assert chunked(g.stack.listen, "/v2/models/metered/infer", 101, {}) == 200

    assert g.listener_updates() == before, "a listener update drains connections"
