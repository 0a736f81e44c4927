"""End to end through the real Envoy: split, weight 0, shadow, pinning, hot reload."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gateway import observe
from tests.stack import LoadLoop, binomial_p_value, count_versions, infer


def test_split_90_10_passes_binomial_test(stack):
    stack.apply({"v1": 90, "v2": 10, "v3": 0})
    seen = count_versions(stack.listen, 2000)
    assert set(seen) == {"v1", "v2"}, seen  # no v3 and no failed request (None)
    p = binomial_p_value(seen["v2"], 2000, 0.10)
    assert p > 0.001, (seen, p)


def test_weight_zero_gets_exactly_no_request(stack):
    stack.apply({"v1": 50, "v2": 0, "v3": 50})
    before = stack.model_requests("v2")
    seen = count_versions(stack.listen, 400)
    assert seen["v2"] == 0 and seen["v1"] > 0 and seen["v3"] > 0, seen
    assert stack.model_requests("v2") == before


def test_shadow_receives_its_percent_and_never_answers(stack):
    stack.apply({"v1": 100}, shadow=("v3", 25))
    stat = "cluster.iris/v3.upstream_rq_total"
    envoy_before = stack.envoy_stat(stat)
    model_before = stack.model_requests("v3")
    n = 1200
    seen = count_versions(stack.listen, n)
    assert seen == {"v1": n}, seen  # every client answer comes from the primary
    # Mirrored requests finish after the client's answer: wait until none is in flight.
    deadline = time.monotonic() + 10
    while stack.envoy_stat("cluster.iris/v3.upstream_rq_active"):
        assert time.monotonic() < deadline, "mirrored requests still in flight"
        time.sleep(0.05)
    mirrored = stack.envoy_stat(stat) - envoy_before
    assert stack.model_requests("v3") - model_before == mirrored
    shadow = observe.route(stack.envoy_url, "iris/split")["route"]["request_mirror_policies"]
    assert [m["cluster"] for m in shadow] == ["iris/v3"]
    assert binomial_p_value(mirrored, n, 0.25) > 0.001, mirrored


def test_pin_header_and_versioned_path_reach_only_that_version(stack):
    stack.apply({"v1": 90, "v2": 10})
    for version in ("v1", "v2", "v3"):
        pinned = count_versions(stack.listen, 50, headers={"x-model-version": version})
        assert pinned == {version: 50}
        by_path = count_versions(stack.listen, 50, path=f"/v2/models/iris/versions/{version}/infer")
        assert by_path == {version: 50}


def test_unknown_pin_value_falls_back_to_the_split(stack):
    stack.apply({"v2": 100})
    assert count_versions(stack.listen, 20, headers={"x-model-version": "v9"}) == {"v2": 20}


def test_reload_under_load_observes_every_split_without_failures(stack):
    splits = [{"v1": 100}, {"v2": 100}, {"v3": 100}, {"v1": 50, "v2": 50}, {"v2": 0, "v3": 1}]
    with LoadLoop(stack.listen) as load:
        for traffic in splits:
            stack.apply(traffic)
            changed = time.monotonic()
            load.wait_results(100)
            seen = load.versions_since(changed)
            expected = {v for v, w in traffic.items() if w}
            assert set(seen) == expected, (traffic, seen)
    assert len(load.results) > 200
    assert load.failures() == []


def test_bad_yaml_under_load_keeps_serving_then_fix_applies(stack):
    stack.apply({"v1": 100})
    with LoadLoop(stack.listen) as load:
        stack.write(
            "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:1]}}\n"
            "    traffic: {v1: -5}\n"
        )
        deadline = time.monotonic() + 5
        while not stack.status()["config"]["error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        error = stack.status()["config"]["error"]
        assert error and "traffic.v1" in error["message"] and ":4:" in error["message"]
        assert count_versions(stack.listen, 20) == {"v1": 20}
        assert observe.weights(observe.route(stack.envoy_url, "iris/split")["route"]) == {
            "iris/v1": 100
        }
        stack.apply({"v2": 100})
        assert stack.status()["config"]["error"] is None
        fixed = time.monotonic()
        load.wait_results(50)
    assert set(load.versions_since(fixed)) == {"v2"}
    assert load.failures() == []


def test_control_plane_gone_envoy_keeps_serving_and_reconnects(stack):
    stack.apply({"v3": 100})
    stack.control_plane.stop(sig=9)
    try:
        with LoadLoop(stack.listen) as load:
            load.wait_results(200)
        assert load.failures() == [] and set(load.versions_since(0)) == {"v3"}
        stack.route({"v1": 100})  # written while the control plane is down
    finally:
        stack.start_control_plane()
    stack.wait_converged()
    assert count_versions(stack.listen, 20) == {"v1": 20}
    stack.apply({"v2": 100})
    assert count_versions(stack.listen, 20) == {"v2": 20}


def test_versioned_metadata_and_errors_pass_through(stack):
    stack.apply({"v1": 100})
    reply = infer(stack.listen, path="/v2/models/iris/versions/v2/infer")
    assert reply.status == 200 and reply.version == "v2"
    missing = infer(stack.listen, path="/v2/models/nope/infer")
    assert missing.status == 404


def test_triton_http_client_through_the_gateway(stack):
    httpclient = pytest.importorskip("tritonclient.http")
    stack.apply({"v1": 100})
    client = httpclient.InferenceServerClient(f"127.0.0.1:{stack.listen}")
    try:
        assert client.is_server_live() and client.is_server_ready()  # answered by Envoy
        assert client.is_model_ready("iris", "v2")  # routed to v2's server
        assert client.get_model_metadata("iris")["name"] == "iris"
        x = np.array([[5.1, 3.5, 1.4, 0.2], [6.2, 3.4, 5.4, 2.3]], dtype=np.float64)
        for binary in (True, False):  # Triton's binary tensor extension, then JSON
            tensor = httpclient.InferInput("input-0", list(x.shape), "FP64")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = [httpclient.InferRequestedOutput("predict", binary_data=binary)]
            result = client.infer("iris", [tensor], outputs=wanted)
            assert result.as_numpy("predict").tolist() == [0, 2]
            assert result.get_response()["model_version"] == "v1"
            pinned = client.infer("iris", [tensor], model_version="v3", outputs=wanted)
            assert pinned.get_response()["model_version"] == "v3"
    finally:
        client.close()
