"""Churn: hundreds of random valid edits under steady traffic, some in bursts. No request
may fail, no cluster may stay warming, and Envoy must end on exactly the latest snapshot."""

from __future__ import annotations

import os
import random
import time

import pytest
from google.protobuf.json_format import MessageToDict

from control_plane.config import parse
from control_plane.translate import translate
from gateway.observe import get_json, get_text
from tests.stack import LoadLoop, Stack

EDITS = int(os.environ.get("CHURN_EDITS", "300"))


def random_config(rng: random.Random, stack: Stack) -> str:
    """A valid routing file: iris always has a live version; other models come and go."""
    live = [p for ports in stack.model_ports.values() for p in ports]

    def endpoints() -> str:
        chosen = rng.sample(live, rng.randint(1, len(live)))
        return "[" + ", ".join(f"127.0.0.1:{p}" for p in chosen) + "]"

    lines = [f"listen: 127.0.0.1:{stack.listen}", "models:"]
    for model in ["iris"] + [m for m in ("alpha", "beta", "gamma") if rng.random() < 0.5]:
        versions = rng.sample(["v1", "v2", "v3", "v4"], rng.randint(1, 4))
        weights = {v: rng.choice([0, 0, 1, 5, 10, 50, 90]) for v in versions}
        if not any(weights.values()):
            weights[versions[0]] = 100
        lines += [f"  {model}:", "    versions:"]
        lines += [f"      {v}: {{endpoints: {endpoints()}}}" for v in versions]
        lines.append("    traffic: {" + ", ".join(f"{v}: {w}" for v, w in weights.items()) + "}")
        if rng.random() < 0.4:
            lines.append(
                f"    shadow: {{version: {rng.choice(versions)}, "
                f"percent: {rng.choice([1, 10, 50])}}}"
            )
        if rng.random() < 0.3:
            lines.append(f"    pin_header: x-pin-{rng.randint(1, 3)}")
        if rng.random() < 0.3:
            lines.append(f"    timeout: {rng.choice(['5s', '10s', '30s'])}")
    return "\n".join(lines) + "\n"


def envoy_state(stack: Stack) -> dict:
    """Active clusters with their endpoints, and the routes Envoy runs."""
    clusters: dict[str, set[str]] = {}
    for line in get_text(f"http://127.0.0.1:{stack.envoy_admin}/clusters").splitlines():
        name, _, rest = line.partition("::")
        if "/" in name:
            host, _, stat = rest.partition("::")
            clusters.setdefault(name, set())
            if stat.startswith("cx_active"):
                clusters[name].add(host)
    dump = get_json(f"http://127.0.0.1:{stack.envoy_admin}/config_dump")
    return {"clusters": clusters, "dump": dump}


def route_targets(route_config: dict) -> dict[str, dict]:
    """Per route of a route configuration (protobuf JSON, Envoy's field names): its match,
    where it sends requests (one cluster, or clusters by weight), what it mirrors (cluster
    and parts per million) and its timeout."""
    targets = {}
    for route in route_config["virtual_hosts"][0]["routes"]:
        action = route.get("route", {})
        weighted = action.get("weighted_clusters", {}).get("clusters", [])
        mirrors = action.get("request_mirror_policies", [])
        targets[route["name"]] = {
            "match": route["match"],
            "cluster": action.get("cluster"),
            "weights": {c["name"]: c["weight"] for c in weighted},
            "mirrors": {
                m["cluster"]: m["runtime_fraction"]["default_value"]["numerator"] for m in mirrors
            },
            "timeout": action.get("timeout"),
        }
    return targets


def expected_routes(text: str) -> dict[str, dict]:
    """Every route of the gateway's route configurations (one per model, one for the
    gateway's own paths), by route name."""
    targets = {}
    for name, routes in translate(parse(text)).routes.items():
        if not name.startswith("grpc/"):
            targets |= route_targets(MessageToDict(routes, preserving_proto_field_name=True))
    return targets


def cluster_differences(actual: dict[str, set[str]], expected: dict[str, set[str]]) -> dict:
    """What differs between two {cluster: endpoints} maps, small enough to print (pytest's
    own diff of two large dicts takes minutes)."""
    return {
        name: {"envoy": sorted(actual.get(name, {"(missing)"})), "file": sorted(want)}
        for name, want in expected.items()
        if actual.get(name) != want
    } | {name: "not in the file" for name in actual.keys() - expected.keys()}


def expected_state(text: str) -> dict[str, set[str]]:
    return {
        f"{m.name}/{v.name}": {str(e) for e in v.endpoints}
        for m in parse(text).models
        for v in m.versions
    }


def assert_envoy_holds(stack: Stack, text: str, status: dict, seed: int) -> None:
    """Envoy ended on exactly the snapshot of `text`: no warming cluster, its clusters and
    endpoints, and every route as it holds it (match, cluster or weights, mirrors, timeout).
    Failures name what differs, briefly (pytest's diff of large dicts takes minutes)."""
    assert status["config"]["error"] is None
    stats = get_text(f"http://127.0.0.1:{stack.envoy_admin}/stats?filter=cluster_manager")
    assert "cluster_manager.warming_clusters: 0" in stats, (seed, stats)
    state = envoy_state(stack)
    assert cluster_differences(state["clusters"], expected_state(text)) == {}, seed
    (routes,) = [c for c in state["dump"]["configs"] if c["@type"].endswith(".RoutesConfigDump")]
    # Envoy ACKed the latest routes (`status`); what it runs counts, not which response
    # brought each route configuration (RDS sends only those that changed).
    held = {}
    for route_config in routes["dynamic_route_configs"]:
        held |= route_targets(route_config["route_config"])
    expected = expected_routes(text)
    differing = {n for n in held.keys() | expected.keys() if held.get(n) != expected.get(n)}
    assert differing == set(), (seed, sorted(differing)[:10])


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_random_edits_under_traffic(tmp_path, model_repository, envoy_binary, mode):
    seed = int(os.environ.get("CHURN_SEED", str(time.time_ns() % 10**6)))
    rng = random.Random(seed)
    stack = Stack(tmp_path, model_repository, delta=mode == "delta")
    try:
        stack.start_all({"v1": 100})
        text = ""
        with LoadLoop(stack.listen, threads=2) as load:
            done = 0
            while done < EDITS:
                burst = rng.choice([1, 1, 1, 5, 10])
                for _ in range(min(burst, EDITS - done)):
                    text = random_config(rng, stack)
                    stack.write(text)
                    done += 1
                    if burst > 1:
                        time.sleep(rng.choice([0, 0.005, 0.03]))
                time.sleep(rng.choice([0.0, 0.02, 0.1]))
            started = time.time()
            time.sleep(0.1)
            status = stack.wait_converged(timeout=20, after=started - 1)
        failures = load.failures()
        if failures:
            stats = get_text(f"http://127.0.0.1:{stack.envoy_admin}/stats")
            flags = [
                s
                for s in stats.splitlines()
                if any(
                    k in s
                    for k in (
                        "no_cluster",
                        "no_route",
                        "none_healthy",
                        "upstream_rq_503",
                        "warming",
                        "rq_retry",
                    )
                )
                and not s.endswith(": 0")
            ]
            raise AssertionError(
                f"seed {seed}: {len(failures)} failed, e.g. {failures[:3]}; Envoy stats: {flags}"
            )
        assert len(load.results) > 500, seed
        assert_envoy_holds(stack, text, status, seed)
    finally:
        stack.stop()
