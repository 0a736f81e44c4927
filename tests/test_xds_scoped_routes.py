"""Scoped routes through the real Envoy (both modes): a request finds its model's route
configuration by the path, whatever the query string or a client's own scope header;
the gateway's own paths have theirs, and a path of no scope is the JSON 404."""

from __future__ import annotations

import http.client
import json

from control_plane.translate import SCOPE_HEADER
from tests.stack import infer


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_every_path_finds_its_scope(stack):
    port = stack.listen
    for path in ("/v2", "/v2?x=1"):
        status, metadata = get(port, path)
        assert status == 200 and metadata["name"] == "infergate", path
    assert get(port, "/v2/health/live") == (200, {"live": True})
    status, model = get(port, "/v2/models/iris?x=1")  # the query is not part of the key
    assert status == 200 and model["name"] == "iris"
    spoofed = {SCOPE_HEADER: "/v2/models/nope/-/-"}
    assert infer(port, headers=spoofed).status == 200  # Envoy sets the key itself
    for path in ("/v2/models/nope/infer", "/v2/models", "/other", "/"):
        status, error = get(port, path)
        assert status == 404 and error == {"error": "no model at this path"}, path
