"""What did Envoy apply, and what do the processes count: the control plane's convergence,
Envoy's config dump, stats and per-host state, and Prometheus metrics.

Shared by the test harness (`tests/stack.py`) and the container harness (`gateway/testing.py`).
Every function takes base URLs such as `http://127.0.0.1:9901`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def get_text(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def get_json(url: str, timeout: float = 5) -> Any:
    return json.loads(get_text(url, timeout))


# --- the control plane ----------------------------------------------------------------------
def converged(status: dict[str, Any], after: float = 0.0, nodes: int = 1) -> bool:
    """Whether a config applied at or after `after` (epoch seconds) is ACKed for every type
    by every connected Envoy, and at least `nodes` are connected."""
    snapshot = status["snapshot"]
    connected = [n for n in status["nodes"] if n["connected"]]
    return bool(
        snapshot
        and (status["config"]["applied_at"] or 0) >= after
        and len(connected) >= nodes
        and all(acked(n, t, v) for n in connected for t, v in snapshot["types"].items())
    )


def acked(node: dict[str, Any], type_name: str, version: str | None) -> bool:
    """Whether `node` ACKed `version` of a type; a node serving on its own `listen` gets a
    listener variant of its own, so there its last sent listener version counts."""
    state = node["types"].get(type_name, {})
    if type_name == "lds" and node.get("listen"):
        version = state.get("sent_version") or version
    return state.get("acked_version") == version


def wait_converged(
    control_plane_url: str, after: float = 0.0, nodes: int = 1, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the control plane's `/status` until `converged`; return that status. A control
    plane that does not answer (restarting) is waited for too."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get_json(f"{control_plane_url}/status")
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        else:
            if converged(last, after, nodes):
                return last
        time.sleep(0.05)
    if isinstance(last, dict):  # what is not converged first: the snapshot and the nodes
        last = {k: last.get(k) for k in ("snapshot", "nodes", "config")}
    raise TimeoutError(f"Envoy did not converge: {json.dumps(last)[:4000]}")


# --- Envoy's admin ----------------------------------------------------------------------------
def config_dump(envoy_admin_url: str, resource: str | None = None) -> dict[str, Any]:
    """Envoy's `/config_dump`, or one resource kind of it (`dynamic_route_configs`, ...);
    `{"configs": []}` when Envoy has no resource of that kind."""
    query = f"?resource={resource}" if resource else ""
    try:
        return get_json(f"{envoy_admin_url}/config_dump{query}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {"configs": []}
        raise


def route_configs(envoy_admin_url: str) -> list[dict[str, Any]]:
    """The dynamic route configurations Envoy runs, each with `version_info`."""
    return config_dump(envoy_admin_url, "dynamic_route_configs")["configs"]


def route(envoy_admin_url: str, name: str) -> dict[str, Any]:
    """The route named `name` (e.g. `iris/split`) in any route configuration Envoy runs."""
    for config in route_configs(envoy_admin_url):
        for vhost in config["route_config"].get("virtual_hosts", []):
            for candidate in vhost.get("routes", []):
                if candidate.get("name") == name:
                    return candidate
    raise LookupError(f"Envoy runs no route named {name!r}")


def weights(action: dict[str, Any], prefix: str = "") -> dict[str, int]:
    """Cluster weights of a route action, names without `prefix`; a single cluster is 100.
    Envoy leaves out weights of 0."""
    if "cluster" in action:
        return {action["cluster"].removeprefix(prefix): 100}
    clusters = action["weighted_clusters"]["clusters"]
    return {c["name"].removeprefix(prefix): int(c.get("weight", 0)) for c in clusters}


def dynamic_cluster(envoy_admin_url: str, name: str) -> dict[str, Any]:
    """The active dynamic cluster `name` as Envoy holds it (outlier detection, thresholds...)."""
    for entry in config_dump(envoy_admin_url, "dynamic_active_clusters")["configs"]:
        if entry["cluster"]["name"] == name:
            return entry["cluster"]
    raise LookupError(f"Envoy has no active cluster {name!r}")


def envoy_stat(envoy_admin_url: str, name: str) -> int:
    """One Envoy counter or gauge (0 when absent), e.g.
    `cluster.iris/v1.outlier_detection.ejections_enforced_total`."""
    query = urllib.parse.quote(f"^{name.replace('.', '[.]')}$")
    for line in get_text(f"{envoy_admin_url}/stats?usedonly&filter={query}").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def hosts(envoy_admin_url: str, cluster: str) -> dict[str, dict[str, Any]]:
    """Per endpoint `host:port` of a cluster: its counters and gauges by name (`rq_total`,
    `cx_connect_fail`, ...) and `health`, the set of Envoy's failure flags (empty: healthy)."""
    found: dict[str, dict[str, Any]] = {}
    for status in get_json(f"{envoy_admin_url}/clusters?format=json").get("cluster_statuses", []):
        if status["name"] != cluster:
            continue
        for host in status.get("host_statuses", []):
            addr = host["address"]["socket_address"]
            values: dict[str, Any] = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
            health = host.get("health_status", {})
            values["health"] = {
                k for k, v in health.items() if k != "eds_health_status" and v is True
            }
            found[f"{addr['address']}:{addr['port_value']}"] = values
    return found


# --- Prometheus ---------------------------------------------------------------------------------
def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`, in Prometheus text
    (0 when there are none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def scrape(url: str, name: str, **labels: str) -> float:
    """`metric` of the Prometheus page at `url` (e.g. a model server's `/metrics`)."""
    return metric(get_text(url), name, **labels)
