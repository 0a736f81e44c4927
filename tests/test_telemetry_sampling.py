"""With `--telemetry-sample`, Envoy logs a fraction of the requests and the store scales
the counts back up (real Envoy)."""

from __future__ import annotations

import math

from control_plane.access_log import sample_key
from tests.stack import LoadLoop, Stack, get_json
from tests.test_telemetry_e2e import Observer, poll, send

WRITTEN = "access_logs.grpc_access_log.logs_written"
COMPLETED = "cluster.iris/v1.upstream_rq_completed"
FRACTION = 0.25


def test_envoy_samples_and_the_store_scales_the_counts_back_up(
    tmp_path, model_repository, envoy_binary
):
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    try:
        stack.start_all({"v1": 100}, "--telemetry-sample", str(FRACTION))
        seen = Observer(stack)
        traffic = f"http://127.0.0.1:{stack.admin}/traffic"
        assert get_json(traffic)["sample_fraction"] == FRACTION
        n = 1000
        assert send(stack.listen, n) == [200] * n
        assert seen.envoy_completed(stack.envoy_admin, "v1") == n
        # Every entry Envoy wrote reached the store; Envoy wrote about a quarter.
        logged = poll(
            lambda: (
                (written := stack.envoy_stat(WRITTEN)) > 0
                and get_json(traffic)["records"] == written
                and written
            ),
            what="the store to hold every entry Envoy wrote",
        )
        sd = math.sqrt(n * FRACTION * (1 - FRACTION))  # binomial: entries written
        assert abs(logged - n * FRACTION) < 5 * sd, logged
        assert seen.metrics()["v1"] == logged / FRACTION  # each entry counts 1 / fraction
        # Scaled up, within 5 standard errors of Envoy's own count (docs/telemetry.md).
        completed = stack.envoy_stat(COMPLETED)
        assert completed == n
        tolerance = 5 * math.sqrt(n * (1 - FRACTION) / FRACTION)  # 274 of 1,000
        assert abs(seen.metrics()["v1"] - completed) <= tolerance
    finally:
        stack.stop()


def runtime_value(stack: Stack, key: str) -> dict | None:
    """The value of a runtime key as Envoy's `/runtime` shows it (None: unset)."""
    entries = get_json(f"http://127.0.0.1:{stack.envoy_admin}/runtime")["entries"]
    return entries.get(key)


def test_a_runtime_fraction_change_reaches_envoy_without_resetting_keep_alive_requests(
    tmp_path, model_repository, envoy_binary
):
    """Above --telemetry-max-rate the control plane lowers the fraction over RTDS: Envoy's
    runtime shows it, fewer entries arrive, the listener is not updated (no drain), and no
    request on the keep-alive connections under load fails."""
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    try:
        stack.start_all({"v1": 100}, "--telemetry-max-rate", "20")
        traffic = f"http://127.0.0.1:{stack.admin}/traffic"
        assert get_json(traffic)["sample_fraction"] == 1
        lds_updates = stack.envoy_stat("listener_manager.lds.update_success")
        rtds_before = stack.envoy_stat("runtime.load_success")
        with LoadLoop(stack.listen, threads=4) as load:
            fraction = poll(
                lambda: (f := get_json(traffic)["sample_fraction"]) <= 0.25 and f,
                timeout=30,
                what="the control plane to sample at 1/4 or less",
            )
            poll(
                lambda: (
                    (value := runtime_value(stack, sample_key(fraction)))
                    and value["final_value"] != "0"
                ),
                what="Envoy's runtime to switch on the logger of the new fraction",
            )
            completed = stack.envoy_stat(COMPLETED)
            written = stack.envoy_stat(WRITTEN)
            poll(
                lambda: stack.envoy_stat(COMPLETED) >= completed + 400,
                timeout=60,
                what="400 more requests",
            )
            logged_share = (stack.envoy_stat(WRITTEN) - written) / (
                stack.envoy_stat(COMPLETED) - completed
            )
        assert load.results and load.failures() == []
        assert logged_share < 0.6, logged_share  # about the fraction (it may move by a step)
        assert stack.envoy_stat("runtime.load_success") > rtds_before
        assert stack.envoy_stat("listener_manager.lds.update_success") == lds_updates
        assert stack.envoy_stat("listener_manager.total_listeners_draining") == 0
    finally:
        stack.stop()
