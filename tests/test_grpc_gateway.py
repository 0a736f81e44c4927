"""The KServe V2 gRPC API through Envoy, with Triton's gRPC client in its default settings:
the split, the pin header, a weight change and shadow mirroring, in both xDS modes."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from tests.stack import Stack


def versions(client, grpcclient, n: int, headers: dict | None = None) -> Counter:
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float64)
    seen: Counter = Counter()
    for _ in range(n):
        tensor = grpcclient.InferInput("input-0", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        result = client.infer("iris", [tensor], headers=headers)
        assert result.as_numpy("predict").tolist() == [0]
        seen[result.get_response().model_version] += 1
    return seen


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_triton_grpc_client_through_the_gateway(tmp_path, model_repository, envoy_binary, mode):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    stack = Stack(
        tmp_path, model_repository, delta=mode == "delta", replicas={"v1": 1, "v2": 1}, grpc=True
    )
    try:
        stack.start_all({"v1": 50, "v2": 50})
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{stack.grpc[0]}")
        try:
            assert client.is_model_ready("iris")
            split = versions(client, grpcclient, 100)
            assert set(split) == {"v1", "v2"}, split
            assert versions(client, grpcclient, 20, {"x-model-version": "v2"}) == {"v2": 20}
            stack.apply({"v1": 0, "v2": 1})
            assert versions(client, grpcclient, 20) == {"v2": 20}
            assert stack.envoy_stat("cluster.iris/v2/grpc.upstream_rq_total") > 0

            stack.apply({"v1": 1, "v2": 0}, shadow=("v2", 100))
            mirrored = "cluster.iris/v2/grpc.upstream_rq_total"
            envoy_before, served_before = stack.envoy_stat(mirrored), stack.model_requests("v2")
            assert versions(client, grpcclient, 40) == {"v1": 40}  # v2's answers are dropped
            deadline = time.monotonic() + 10
            while stack.model_requests("v2") - served_before < 40:
                assert time.monotonic() < deadline, "the mirrored calls did not reach v2"
                time.sleep(0.05)
            assert stack.envoy_stat(mirrored) - envoy_before == 40
        finally:
            client.close()
    finally:
        stack.stop()
