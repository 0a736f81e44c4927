"""The floor of a fan-out on this machine: bare grpcio asyncio streams, one message out
and one ACK back per client, with no xDS logic at all. What a push to N clients costs
beyond this is the control plane's own.

`run(clients)` starts a server process and client processes laid out as the simulated
Envoys are (`fleet.py`: 500 streams per process, 25 per channel), and pushes a message
of RESPONSE_BYTES to every stream `pushes` times. Times are the server's, from the start
of a push to each ACK read: the same span as "snapshot to all ACKed" of a real push.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.stats import percentile
from bench.xds_scale.fleet import CLIENTS_PER_CHANNEL, stop_processes, workers_for
from bench.xds_scale.plane import cpu_seconds, memory_mb
from bench.xds_scale.worker import CHANNEL_OPTIONS, RAMP_BATCH, RAMP_PAUSE_S
from control_plane.service import GRPC_OPTIONS
from gateway.processes import free_port

METHOD = "/floor.Floor/Push"
RESPONSE_BYTES = 1500  # about one route configuration of the 10-model push
LOCAL = "127.0.0.1"
TIMEOUT_S = 120.0  # for all streams to open, and for every answer to a push


class Server:
    """Writes each push to every open stream; collects the ACKs."""

    def __init__(self) -> None:
        self.streams: set[asyncio.Queue] = set()
        self.push_started = 0.0
        self.ack_times: list[float] = []
        self.all_acked = asyncio.Event()
        self.expected = 0

    async def serve(self, requests, context) -> None:
        pushes: asyncio.Queue[bytes] = asyncio.Queue()

        async def read() -> None:
            await anext(aiter(requests))  # the client's hello: not an ACK
            async for _ack in requests:
                self.ack_times.append(time.monotonic() - self.push_started)
                if len(self.ack_times) == self.expected:
                    self.all_acked.set()

        reader = asyncio.create_task(read())
        self.streams.add(pushes)
        try:
            while True:
                await context.write(await pushes.get())
        finally:
            self.streams.discard(pushes)
            reader.cancel()

    async def push(self, message: bytes) -> list[float]:
        self.ack_times, self.expected = [], len(self.streams)
        self.all_acked.clear()
        self.push_started = time.monotonic()
        for stream in self.streams:
            stream.put_nowait(message)
        await asyncio.wait_for(self.all_acked.wait(), TIMEOUT_S)
        return self.ack_times


async def _serve(port: int) -> None:
    """The server process: `push N` on stdin pushes once to N streams (waiting until N
    are open) and prints the ACK times as a JSON line, or an error (a stream lost)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)  # the control plane's
    floor = Server()
    handler = grpc.stream_stream_rpc_method_handler(
        floor.serve, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("floor.Floor", {"Push": handler})]
    )
    server.add_insecure_port(f"{LOCAL}:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    message = bytes(RESPONSE_BYTES)
    print(json.dumps({"event": "listening"}), flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        want = int(line.split()[1])
        deadline = time.monotonic() + TIMEOUT_S
        while len(floor.streams) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            event = {"event": "pushed", "times": await floor.push(message)}
        except TimeoutError:
            event = {"event": "error", "error": f"{len(floor.ack_times)} of {want} answered"}
        print(json.dumps(event), flush=True)
    await server.stop(0)


async def _clients(address: str, clients: int) -> None:
    """A client process: `clients` streams that ACK every message, until stdin closes."""
    channels = [
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        for _ in range(math.ceil(clients / CLIENTS_PER_CHANNEL))
    ]

    async def client(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(METHOD)()
        await call.write(b"hello")
        while (message := await call.read()) is not grpc.aio.EOF:
            await call.write(message[:8])

    tasks = []
    for i in range(clients):
        tasks.append(asyncio.create_task(client(channels[i % len(channels)])))
        if i % RAMP_BATCH == RAMP_BATCH - 1:
            await asyncio.sleep(RAMP_PAUSE_S)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()


def run(workdir: Path, clients: int, pushes: int) -> dict[str, Any]:
    """Push `pushes` times to `clients` streams; the server's CPU per pushed client and the
    time until every ACK was read."""
    port = free_port()
    module = [sys.executable, "-m", "bench.xds_scale.floor"]
    procs: list[subprocess.Popen] = []
    with open(workdir / f"floor-{clients}c.log", "ab") as log:
        try:
            server = subprocess.Popen(
                [*module, "serve", str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            procs.append(server)
            assert server.stdin and server.stdout
            json.loads(server.stdout.readline())  # listening
            n = workers_for(clients)
            workers = [
                subprocess.Popen(
                    [*module, "clients", f"{LOCAL}:{port}", str(clients // n + (i < clients % n))],
                    stdin=subprocess.PIPE,
                    stderr=log,
                )
                for i in range(n)
            ]
            procs += workers

            def push() -> list[float]:
                server.stdin.write(f"push {clients}\n")
                server.stdin.flush()
                event = json.loads(server.stdout.readline())
                if event["event"] != "pushed":
                    raise RuntimeError(f"grpc floor, {clients} clients: {event['error']}")
                return event["times"]

            push()  # every stream open
            time.sleep(0.5)
            cpu0 = cpu_seconds(server.pid)
            clients_cpu0 = sum(cpu_seconds(w.pid) for w in workers)
            last = []
            for _ in range(pushes):
                last.append(max(push()))
                time.sleep(0.1)
            cpu = cpu_seconds(server.pid) - cpu0
            clients_cpu = sum(cpu_seconds(w.pid) for w in workers) - clients_cpu0
            memory = memory_mb(server.pid)
        finally:
            stop_processes(procs)
    print(
        f"  grpc floor, {clients} clients: all ACKed p99 {percentile(last, 99) * 1000:.1f} ms",
        file=sys.stderr,
    )
    return {
        "clients": clients,
        "pushes": pushes,
        "all_acked_ms": {
            "p50": round(percentile(last, 50) * 1000, 1),
            "p99": round(percentile(last, 99) * 1000, 1),
        },
        "server_cpu_ms_per_pushed_client": round(cpu / pushes / clients * 1000, 3),
        "clients_cpu_s_per_push": round(clients_cpu / pushes, 3),
        "server_memory_mb": memory,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.xds_scale.floor")
    sub = p.add_subparsers(dest="role", required=True)
    sub.add_parser("serve").add_argument("port", type=int)
    c = sub.add_parser("clients")
    c.add_argument("address")
    c.add_argument("clients", type=int)
    args = p.parse_args()
    if args.role == "serve":
        asyncio.run(_serve(args.port))
    else:
        asyncio.run(_clients(args.address, args.clients))


if __name__ == "__main__":
    main()
