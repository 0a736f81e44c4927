"""Usage per consumer behind the gateway's API management, through a real Envoy: keys and a
JWT name the consumer, 401 and 403 count as rejections of the right consumer, and no key
shows in /traffic or /metrics. (The stack is test_auth_e2e's fixture, a fresh instance.)"""

from __future__ import annotations

from control_plane.telemetry import ANONYMOUS, OUTCOMES
from control_plane.translate_auth import CONSUMER_HEADER
from tests.stack import get_json, get_text
from tests.test_auth_e2e import AuthStack, auth  # noqa: F401 (the fixture)
from tests.test_telemetry_e2e import poll


def test_usage_names_authenticated_consumers_and_counts_401_and_403(auth: AuthStack):  # noqa: F811
    alice, bob = auth.keys["alice"], auth.keys["bob"]
    iris = "/v2/models/iris/infer"
    assert [auth.status(iris, **{"x-api-key": alice}) for _ in range(3)] == [200] * 3
    assert [auth.status(iris, **auth.bearer(bob)) for _ in range(2)] == [403] * 2
    assert auth.status(iris, **{CONSUMER_HEADER: "alice"}) == 401  # a claim is no credential
    assert auth.status(iris, **{"x-api-key": "not-a-key"}) == 401
    assert auth.status(iris, **auth.bearer(auth.idp.token(aud="elsewhere"))) == 401
    assert auth.status(iris, **auth.bearer(auth.idp.token("carol"))) == 200
    assert auth.status("/v2/models/nosuch/infer", **{"x-api-key": alice}) == 404

    zero = dict.fromkeys(OUTCOMES, 0.0)
    want = {
        ("alice", "iris"): zero | {"ok": 3},
        ("bob", "iris"): zero | {"forbidden": 2},
        ("carol", "iris"): zero | {"ok": 1},
        (ANONYMOUS, "iris"): zero | {"unauthorized": 3},  # incl. a JWT for another audience
        (ANONYMOUS, "nosuch"): zero | {"client_error": 1},  # the open catch-all 404
    }
    admin = auth.stack.control_plane_url

    def usage() -> dict:
        rows = get_json(f"{admin}/traffic")["consumers"]
        return {(r["consumer"], r["model"]): r["total"]["outcomes"] for r in rows}

    poll(lambda: usage() == want, what=f"usage {want}")
    shown = get_text(f"{admin}/traffic") + get_text(f"{admin}/metrics")
    assert 'infergate_consumer_requests_total{consumer="bob",model="iris",outcome="forbidden"}' in (
        shown
    )
    assert alice not in shown and bob not in shown
