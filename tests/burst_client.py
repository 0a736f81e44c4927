"""Many ADS streams opened at once, as Envoys do after a control-plane restart.

`python -m tests.burst_client ADDRESS STREAMS` opens STREAMS streams (25 per channel), each
sending Envoy's first CDS request, prints `failed N` once every write has ended (N: the
streams that failed), and holds the streams open until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from control_plane.snapshot import CLUSTER
from control_plane.xds_server import ADS_SERVICE

PER_CHANNEL = 25


async def main(address: str, streams: int) -> None:
    channels = [grpc.aio.insecure_channel(address) for _ in range(-(-streams // PER_CHANNEL))]
    method = f"/{ADS_SERVICE}/StreamAggregatedResources"
    calls, writes = [], []
    for i in range(streams):
        call = channels[i % len(channels)].stream_stream(method)()
        first = DiscoveryRequest(type_url=CLUSTER)
        first.node.id, first.node.cluster = f"burst-{i}", "burst"
        calls.append(call)
        writes.append(call.write(first.SerializeToString()))
    results = await asyncio.gather(*writes, return_exceptions=True)
    print("failed", sum(isinstance(r, Exception) for r in results), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for call in calls:
        call.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
