"""The translator's listeners as the real Envoy runs them: one socket per address, so a
second Envoy given the same listener address fails to bind instead of taking a share of the
connections (issue 8.1)."""

from __future__ import annotations

import time

from gateway.processes import free_port
from tests.stack import Stack, count_versions, get_text


def lds_nack(stack: Stack, node_id: str, timeout: float = 20.0) -> dict:
    """The listener NACK the control plane has recorded for `node_id`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in stack.status()["nodes"]:
            nack = node["types"].get("lds", {}).get("nack")
            if node["node_id"] == node_id and nack:
                return nack
        time.sleep(0.05)
    raise TimeoutError(f"{node_id} did not reject its listener: {stack.status()['nodes']}")


def test_a_second_envoy_on_the_same_listener_address_fails_to_bind(
    tmp_path, model_repository, envoy_binary
):
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    try:
        stack.start_all({"v1": 100})
        second_admin = free_port()
        stack.launch_envoy("second-envoy", second_admin, stack.delta)
        nack = lds_nack(stack, "second-envoy")
        assert f"127.0.0.1:{stack.listen}" in nack["message"], nack
        assert "in use" in nack["message"], nack  # Envoy's own words: Address already in use
        stats = get_text(f"http://127.0.0.1:{second_admin}/stats?filter=listener_manager")
        assert "listener_manager.total_listeners_active: 0" in stats, stats
        assert count_versions(stack.listen, 20) == {"v1": 20}  # the first Envoy serves on
    finally:
        stack.stop()
