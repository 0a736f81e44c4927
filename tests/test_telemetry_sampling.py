"""With `--telemetry-sample`, Envoy logs a fraction of the requests and the store scales
the counts back up (real Envoy)."""

from __future__ import annotations

import math

from tests.stack import Stack, get_json
from tests.test_telemetry_e2e import Observer, poll, send

WRITTEN = "access_logs.grpc_access_log.logs_written"
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
    finally:
        stack.stop()
