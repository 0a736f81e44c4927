"""Limits through the real Envoy: rate (local token buckets), global quota (the control
plane's rate limit service, shared by two Envoys, failing open or closed) and body size.
Consumers authenticate with API keys. Every change is applied by editing the routing file
(hot reload)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import pytest

from gateway.processes import free_port, wait_http
from tests.stack import IRIS_BODY, Stack, routing_yaml


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_repository, envoy_binary):
    s = Stack(tmp_path_factory.mktemp("limits"), model_repository, replicas={"v1": 1})
    try:
        s.start_all({"v1": 100})
        yield s
    finally:
        s.stop()


CONSUMERS = ("alice", "bob", "carol", "dave", "erin", "frank", "batch-job", "web-app")
KEYS_FILE = "".join(f"{name}: {name}-limits-test-key-01\n" for name in CONSUMERS)


def as_consumer(name: str) -> dict[str, str]:
    """The headers that make a request come from consumer `name`: its API key (from
    KEYS_FILE, which the routing file names as `consumers.keys_file`)."""
    return {"x-api-key": f"{name}-limits-test-key-01"}


def consumers_yaml(workdir: Path, priority: str = "") -> str:
    """The top-level `consumers` block, with the keys file written beside the routing file."""
    (workdir / "api-keys.yaml").write_text(KEYS_FILE)
    return f"consumers: {{keys_file: api-keys.yaml{priority}}}\n"


def apply_limits(stack: Stack, limits: str, top: str = "") -> None:
    """iris with `limits` (YAML flow mapping) and top-level lines `top`, applied and ACKed."""
    top += consumers_yaml(stack.workdir)
    text = routing_yaml(stack.listen, stack.model_ports, {"v1": 100}, extra=top)
    text = text.replace("    traffic:", f"    limits: {limits}\n    traffic:")
    if stack.config.read_text() == text:
        return
    started = time.time()
    stack.write(text)
    stack.wait_converged(after=started)


def send(port: int, consumer: str, conn: http.client.HTTPConnection | None = None):
    """One inference request; (status, retry-after header)."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"content-type": "application/json", **as_consumer(consumer)}
    conn.request("POST", "/v2/models/iris/infer", IRIS_BODY, headers)
    reply = conn.getresponse()
    reply.read()
    return reply.status, reply.getheader("retry-after")


def hammer(port: int, consumer: str, seconds: float, threads: int = 2) -> tuple[list, float]:
    """Requests as fast as `threads` connections go, for `seconds`; (replies, elapsed)."""
    replies: list[tuple[int, str | None]] = []
    start = time.monotonic()

    def work() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() - start < seconds:
            replies.append(send(port, consumer, conn))
        conn.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return replies, time.monotonic() - start


def test_a_burst_is_admitted_at_the_configured_rate(stack):
    apply_limits(stack, "{rate: {per_consumer: 20/s, burst: 20}}")
    replies, elapsed = hammer(stack.listen, "alice", 5.0)
    admitted = sum(1 for status, _ in replies if status == 200)
    expected = 20 * elapsed + 20  # the full bucket, then the refill
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, len(replies))
    rejected = [r for r in replies if r[0] != 200]
    assert len(rejected) > len(replies) / 2  # a real burst: most were over the rate
    assert set(rejected) == {(429, "1")}
    # Another consumer has a bucket of its own.
    assert [send(stack.listen, "bob")[0] for _ in range(20)] == [200] * 20


def test_under_the_rate_no_request_is_rejected(stack):
    apply_limits(stack, "{rate: {per_consumer: 20/s, burst: 5}}")
    statuses = []
    for _ in range(30):  # 10/s for 3 s: half the rate
        statuses.append(send(stack.listen, "carol")[0])
        time.sleep(0.1)
    assert statuses == [200] * 30


def test_a_quota_is_shared_by_two_envoys(stack):
    apply_limits(stack, "{quota: {per_consumer: 30/h}}")
    second = free_port()
    envoy = stack.launch_envoy("second-envoy", free_port(), stack.delta, listen=second)
    stack.wait_converged(nodes=2)
    wait_http(f"http://127.0.0.1:{second}/v2/health/ready", child=envoy)
    replies = [send(port, "dave") for _ in range(30) for port in (stack.listen, second)]
    assert sum(1 for status, _ in replies if status == 200) == 30
    over = [r for r in replies if r[0] != 200]
    assert {status for status, _ in over} == {429}
    assert all(0 < int(wait) <= 3600 for _, wait in over)
    assert send(second, "erin")[0] == 200  # another consumer's quota is untouched
    envoy.stop()


def test_quota_service_down_fails_open_or_closed_as_configured(stack):
    for mode, expected in (("closed", 503), ("open", 200)):
        apply_limits(
            stack, "{quota: {per_consumer: 1000/h}}", f"quota_service: {{on_failure: {mode}}}\n"
        )
        assert send(stack.listen, "frank")[0] == 200
        stack.control_plane.stop()
        try:
            assert [send(stack.listen, "frank")[0] for _ in range(5)] == [expected] * 5
        finally:
            stack.start_control_plane()
            stack.wait_converged()


def raw_post(port: int, size: int, expect_continue: bool) -> bytes:
    """POST `size` bytes on a raw socket: headers and the whole body at once (or after the
    100 Continue), then read the reply until the server closes."""
    body = (IRIS_BODY + b" " * size)[:size] if size >= len(IRIS_BODY) else b"x" * size
    credential = "".join(f"{k}: {v}\r\n" for k, v in as_consumer("alice").items())
    head = (
        f"POST /v2/models/iris/infer HTTP/1.1\r\nhost: gateway\r\n{credential}"
        f"content-type: application/json\r\ncontent-length: {size}\r\nconnection: close\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if expect_continue:
            sock.sendall(head.encode() + b"expect: 100-continue\r\n\r\n")
            interim = sock.recv(1024)
            if not interim.startswith(b"HTTP/1.1 100"):
                return interim
            sock.sendall(body)
        else:
            sock.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("expect_continue", [False, True])
def test_a_body_over_max_body_gets_413_and_at_the_limit_200(stack, expect_continue):
    apply_limits(stack, "{max_body: 1KiB}")
    assert raw_post(stack.listen, 1024, expect_continue).startswith(b"HTTP/1.1 200")
    over = raw_post(stack.listen, 1025, expect_continue)
    assert over.startswith(b"HTTP/1.1 413") and b'{"error":' in over


def test_a_body_far_over_max_body_sent_whole_gets_the_413_not_a_reset(stack):
    """32 MB against `max_body: 1MiB`, sent whole before reading: Envoy's own early 413
    would close the connection with the body unread (a reset); the oversize route hands it
    to a model server that reads and drops it, then answers 413 for the gateway's limit."""
    apply_limits(stack, "{max_body: 1MiB}")
    reply = raw_post(stack.listen, 32 << 20, expect_continue=False)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"exceeds 1048576 bytes" in reply


def test_a_body_over_the_model_servers_own_limit_gets_its_413_through_the_gateway(stack):
    """32 MB (the model server takes 16 MiB) sent whole before reading: the server reads
    and drops the body, so the client reads the 413 instead of a reset."""
    apply_limits(stack, "{}")
    reply = raw_post(stack.listen, 32 << 20, expect_continue=False)
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds" in reply
