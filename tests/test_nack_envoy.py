"""A resource that the real Envoy rejects: recorded as NACKed with Envoy's message,
not resent in a loop, and the previous config keeps serving; in both xDS modes."""

from __future__ import annotations

import asyncio
import time

import pytest
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher

from control_plane.config import parse
from control_plane.service import ControlPlane
from control_plane.snapshot import ROUTE, build_snapshot
from control_plane.translate import model_routes_name, translate
from tests.stack import Stack, count_versions


def bad_routes_snapshot(plane: ControlPlane, text: str):
    """A snapshot whose routes start with a regex that Envoy rejects."""
    resources = translate(parse(text))
    name = model_routes_name("iris")
    routes = RouteConfiguration()
    routes.CopyFrom(resources.routes[name])  # translated messages are shared: never modify
    resources.routes[name] = routes
    vhost = routes.virtual_hosts[0]
    bad = Route(
        match=RouteMatch(safe_regex=RegexMatcher(regex="(unclosed")),
        route=RouteAction(cluster="iris/v2"),
    )
    kept = list(vhost.routes)
    del vhost.routes[:]
    vhost.routes.extend([bad, *kept])
    return build_snapshot(resources, plane.epoch)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_nack_is_recorded_not_resent_and_old_config_serves(
    tmp_path, model_repository, envoy_binary, delta
):
    stack = Stack(tmp_path, model_repository, delta=delta, replicas={"v1": 1, "v2": 1})
    plane = ControlPlane(stack.config, ("127.0.0.1", stack.xds), ("127.0.0.1", stack.admin))
    try:
        await asyncio.to_thread(stack.start_models)
        good = stack.route({"v1": 100})
        await plane.start()
        await asyncio.to_thread(stack.start_envoy)
        await asyncio.to_thread(stack.wait_converged)

        plane.cache.set(bad_routes_snapshot(plane, good))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rds = plane.status()["nodes"][0]["types"]["rds"]
            if rds["nack"]:
                break
            await asyncio.sleep(0.05)
        assert rds["nack"]["version"] == plane.cache.snapshot.types[ROUTE].version
        assert "missing )" in rds["nack"]["message"], rds["nack"]  # Envoy's own words
        assert await asyncio.to_thread(count_versions, stack.listen, 30) == {"v1": 30}

        started = time.time()
        stack.route({"v2": 100})
        await asyncio.to_thread(stack.wait_converged, 10.0, started)
        rds_after = plane.status()["nodes"][0]["types"]["rds"]
        assert rds_after["nack"] is None
        # The rejected routes went out once; the next response was the fixed config (a
        # resend loop would have sent it again right after each NACK).
        assert (rds_after["sent_count"], rds_after["nack_count"]) == (rds["sent_count"] + 1, 1)
        assert await asyncio.to_thread(count_versions, stack.listen, 30) == {"v2": 30}
    finally:
        await asyncio.to_thread(stack.stop)
        await plane.stop()
