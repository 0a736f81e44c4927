"""A worker process holding many simulated Envoys over a few gRPC channels.

`python -m bench.xds_scale.worker ADDRESS --clients N [--delta]` writes JSON lines on
stdout: `{"event": "routes", "version": V, "times": [...]}` once every client of this
worker has ACKed route version V (ACK times from `time.monotonic()`), and
`{"event": "error", ...}` if a stream fails (with `--reconnect`, a stream that ends
is opened again at once, as Envoys do when the control plane restarts). It exits when
its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading

import grpc

from bench.xds_scale.client import SimEnvoy

CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, like Envoys
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 50),  # reconnect soon after a restart
    ("grpc.max_reconnect_backoff_ms", 200),
]
RETRY_S = 0.05  # pause before reopening a stream that ended
RAMP_BATCH, RAMP_PAUSE_S = 50, 0.1  # streams opened at start, per pause


class RouteAcks:
    """Collects RDS ACK times per version, the first per client (a client that reconnects
    ACKs again); reports a version once all clients have it."""

    def __init__(self, clients: int):
        self.clients = clients
        self.times: dict[str, dict[str, float]] = {}
        self.reported: set[str] = set()

    def __call__(self, client: str, version: str, at: float) -> None:
        if version in self.reported:
            return
        times = self.times.setdefault(version, {})
        times.setdefault(client, at)
        if len(times) == self.clients:
            emit({"event": "routes", "version": version, "times": list(times.values())})
            self.reported.add(version)
            del self.times[version]


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _stdin_closed(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
    sys.stdin.read()
    loop.call_soon_threadsafe(done.set)


async def run(
    address: str, clients: int, channels: int, delta: bool, prefix: str, reconnect: bool
) -> None:
    done = asyncio.Event()
    threading.Thread(
        target=_stdin_closed, args=(asyncio.get_running_loop(), done), daemon=True
    ).start()
    chans = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)]
    acks = RouteAcks(clients)
    envoys = [SimEnvoy(chans[i % channels], f"{prefix}-{i}", delta, acks) for i in range(clients)]

    async def guarded(envoy: SimEnvoy) -> None:
        while True:
            try:
                await envoy.run()
                error = "stream ended"
            except asyncio.CancelledError:
                return
            except Exception as exc:  # noqa: BLE001 (reported to the parent)
                error = repr(exc)[:300]
            if done.is_set():
                return
            if not reconnect:
                emit({"event": "error", "client": envoy.node_id, "error": error})
                return
            emit({"event": "reconnect", "client": envoy.node_id, "error": error})
            await asyncio.sleep(RETRY_S)

    tasks = []
    for i, envoy in enumerate(envoys):  # a ramp: thousands of handshakes at once starve
        tasks.append(asyncio.create_task(guarded(envoy)))  # this process's ping replies
        if i % RAMP_BATCH == RAMP_BATCH - 1:
            await asyncio.sleep(RAMP_PAUSE_S)
    try:
        await done.wait()
    finally:
        for envoy in envoys:
            await envoy.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for chan in chans:
            await chan.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.xds_scale.worker")
    p.add_argument("address")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--delta", action="store_true")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--reconnect", action="store_true", help="reopen streams that end")
    args = p.parse_args()
    asyncio.run(
        run(args.address, args.clients, args.channels, args.delta, args.prefix, args.reconnect)
    )


if __name__ == "__main__":
    main()
