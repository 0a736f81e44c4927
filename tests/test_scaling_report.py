"""The supervisor reports the autoscaler's decisions to the control plane (`PUT
/autoscaling`), which shows them in `/status` and on `/metrics`."""

from __future__ import annotations

import asyncio

import aiohttp

from control_plane.config import parse
from gateway.autoscaling import Autoscaling
from gateway.observe import get_json, get_text, metric
from tests.stack import ADMIN_TOKEN

AUTOSCALED = """\
models:
  iris:
    versions:
      v1: {autoscale: {min: 2, max: 4, target_concurrency: 4}}
"""

DECISION = {
    "desired": 3,
    "ready": 1,
    "stable_concurrency": 9.5,
    "panic_concurrency": 11.0,
    "panic": True,
    "reason": "desired 3 (ready 1): ...",
}


async def test_reports_need_the_token_and_a_well_formed_body(plane):
    url = f"http://127.0.0.1:{plane.admin_address[1]}/autoscaling"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.put(url, json={"iris/v1": DECISION}) as resp:
            assert resp.status == 401
        bad = {"iris/v1": {**DECISION, "desired": "3"}}
        async with http.put(url, json=bad, headers=auth) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "iris/v1.desired: missing or of the wrong type"
        async with http.put(url, json={"iris": DECISION}, headers=auth) as resp:
            assert resp.status == 400 and "'model/version'" in (await resp.json())["error"]
        assert plane.status()["autoscale"] == {}
        async with http.put(url, json={"iris/v1": DECISION}, headers=auth) as resp:
            assert resp.status == 200
    assert plane.status()["autoscale"] == {"iris/v1": DECISION}


async def test_the_supervisors_decisions_reach_status_and_metrics(plane):
    admin = f"http://127.0.0.1:{plane.admin_address[1]}"
    autoscaling = Autoscaling(admin, ADMIN_TOKEN)
    autoscaling.follow(parse(AUTOSCALED))
    # No traffic: the decision is `min`, reported with its numbers.
    await asyncio.to_thread(autoscaling.step, 100.0, {("iris", "v1"): 1}, {})
    status = await asyncio.to_thread(get_json, admin + "/status")
    assert status["autoscale"]["iris/v1"]["desired"] == 2
    assert status["autoscale"]["iris/v1"]["ready"] == 1
    text = await asyncio.to_thread(get_text, admin + "/metrics")
    labels = {"model": "iris", "version": "v1"}
    assert metric(text, "infergate_autoscaler_desired_replicas", **labels) == 2
    assert metric(text, "infergate_autoscaler_ready_replicas", **labels) == 1
    assert metric(text, "infergate_autoscaler_panic", **labels) == 0
    assert metric(text, "infergate_autoscaler_concurrency", **labels, window="stable") == 0
