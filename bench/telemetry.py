"""`python -m bench.telemetry`: what Envoy's access logs to the control plane cost.

One run, one JSON document on stdout:
- gateway requests/s and p50/p99 at concurrency 16 with telemetry on and off (two stacks,
  runs interleaved, medians over rounds, ratios per round);
- the control plane's CPU seconds per 10,000 logged requests (during the "on" runs, minus
  the idle control plane of the "off" stack over the same time);
- the largest rate one control plane absorbs: a client streams pre-encoded access log
  batches (200 entries, as Envoy's 64 KiB buffer holds) as fast as it can for a while,
  and the control plane's counters say how many it took in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.__main__ import machine
from bench.load import LoadResult, load_generator, medians
from bench.stack import BenchStack
from bench.stats import median
from gateway.processes import host_port

CONCURRENCY = 16
BATCH = 200


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(stack: BenchStack, name: str) -> int:
    child = next(c for c in stack.children if c.name.startswith(name))
    assert child.proc is not None
    return child.proc.pid


def control_plane_pid(stack: BenchStack) -> int:
    return pid_of(stack, "control plane")


def logged(stack: BenchStack) -> float:
    """Requests the control plane has counted (all versions, scaled)."""
    with urllib.request.urlopen(f"http://{host_port(stack.admin)}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("infergate_requests_total{")
    )


def overhead(on: BenchStack, off: BenchStack, load, rounds: int, seconds: float) -> dict[str, Any]:
    stacks = {"off": off, "on": on}
    for stack in stacks.values():
        load.run(stack.gateway_url, CONCURRENCY, 1.0)  # warm up
    runs: dict[str, list[LoadResult]] = {name: [] for name in stacks}
    cpu_on = cpu_idle = requests_logged = 0.0
    envoy_cpu = {name: 0.0 for name in stacks}  # CPU time is steadier than rates when shared
    for i in range(rounds):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            before = {n: cpu_seconds(control_plane_pid(s)) for n, s in stacks.items()}
            count = logged(on)
            envoy_before = cpu_seconds(pid_of(stacks[name], "envoy"))
            result = load.run(stacks[name].gateway_url, CONCURRENCY, seconds)
            envoy_cpu[name] += cpu_seconds(pid_of(stacks[name], "envoy")) - envoy_before
            if name == "on":
                time.sleep(0.5)  # Envoy's last batch (flushed every 200 ms)
                requests_logged += logged(on) - count
                cpu_on += cpu_seconds(control_plane_pid(on)) - before["on"]
                cpu_idle += cpu_seconds(control_plane_pid(off)) - before["off"]
            runs[name].append(result)
            print(
                f"  round {i + 1}/{rounds} telemetry {name:3}: {result.rps:8.1f} req/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms",
                file=sys.stderr,
            )
    pairs = list(zip(runs["off"], runs["on"], strict=True))
    on_m, off_m = medians(runs["on"]), medians(runs["off"])
    served = sum(r.requests for r in runs["on"])
    envoy_per_10k = {
        name: envoy_cpu[name] / sum(r.requests for r in runs[name]) * 10_000 for name in stacks
    }
    return {
        "concurrency": CONCURRENCY,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "telemetry_off": off_m,
        "telemetry_on": on_m,
        "on_over_off_rps": round(median([b.rps / a.rps for a, b in pairs]), 3),
        "on_over_off_p99": round(on_m["p99_ms"] / off_m["p99_ms"], 3),
        "envoy_cpu_seconds_per_10k_requests": {k: round(v, 3) for k, v in envoy_per_10k.items()},
        "envoy_cpu_on_over_off": round(envoy_per_10k["on"] / envoy_per_10k["off"], 3),
        "requests_served_on": served,
        "requests_logged_on": round(requests_logged),
        "control_plane_cpu_seconds_on": round(cpu_on, 3),
        "idle_control_plane_cpu_seconds": round(cpu_idle, 3),
        "control_plane_cpu_seconds_per_10k_logged": round(
            (cpu_on - cpu_idle) / requests_logged * 10_000, 3
        ),
        "runs": {name: [r.as_dict() for r in rs] for name, rs in runs.items()},
    }


SENDER = """
import sys, time, grpc
from bench.telemetry import sample_batch
target, seconds, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
first, rest = sample_batch(batch, identify=True), sample_batch(batch, identify=False)
channel = grpc.insecure_channel(target)
call = channel.stream_unary(
    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
    request_serializer=None, response_deserializer=None)
started = time.monotonic()
deadline = started + seconds
sent = 0
def messages():
    global sent
    yield first
    sent += batch
    while time.monotonic() < deadline:
        yield rest
        sent += batch
call(messages())
print(sent, time.monotonic() - started)
"""


def sample_batch(size: int, identify: bool) -> bytes:
    """A StreamAccessLogsMessage of `size` entries like the ones Envoy sends."""
    from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

    message = StreamAccessLogsMessage()
    if identify:
        message.identifier.node.id = "bench-sender"
        message.identifier.log_name = "infergate"
    for i in range(size):
        entry = message.http_logs.log_entry.add()
        common = entry.common_properties
        common.upstream_cluster = "iris/v1" if i % 10 else "iris/v2"
        common.route_name = "iris/split"
        common.downstream_remote_address.socket_address.address = "127.0.0.1"
        common.downstream_remote_address.socket_address.port_value = 40000 + i
        common.upstream_remote_address.socket_address.address = "127.0.0.1"
        common.upstream_remote_address.socket_address.port_value = 9001
        common.start_time.FromNanoseconds(time.time_ns())
        common.time_to_last_downstream_tx_byte.FromNanoseconds(1_500_000 + i)
        common.duration.FromNanoseconds(1_500_000 + i)
        common.custom_tags["infergate.sample"] = "1.0"
        entry.protocol_version = entry.HTTP11
        entry.request.request_method = 3  # POST
        entry.request.path = "/v2/models/iris/infer"
        entry.request.authority = "127.0.0.1:8080"
        entry.request.request_id = f"{i:08x}-7a1c-4f5e-9b2d-0123456789ab"
        entry.request.request_headers_bytes = 150
        entry.request.request_body_bytes = 103
        entry.response.response_code.value = 200
        entry.response.response_headers_bytes = 120
        entry.response.response_body_bytes = 180
    return message.SerializeToString()


def capacity(stack: BenchStack, seconds: float, senders: int = 2) -> dict[str, Any]:
    """Stream access logs at the control plane as fast as `senders` clients can; the rate
    is over the senders' streaming time (their start-up is not counted)."""
    pid = control_plane_pid(stack)
    before_count, before_cpu = logged(stack), cpu_seconds(pid)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SENDER, host_port(stack.xds), str(seconds), str(BATCH)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(senders)
    ]
    reports = [p.communicate()[0].split() for p in procs]
    sent = sum(int(r[0]) for r in reports)
    elapsed = max(float(r[1]) for r in reports)
    time.sleep(0.5)
    absorbed = logged(stack) - before_count
    cpu = cpu_seconds(pid) - before_cpu  # includes the idle senders' start-up
    return {
        "seconds": round(elapsed, 2),
        "senders": senders,
        "entries_per_message": BATCH,
        "sent": sent,
        "absorbed": round(absorbed),
        "absorbed_per_second": round(absorbed / elapsed),
        "control_plane_cpu_cores_at_most": round(cpu / elapsed, 2),
        "control_plane_cpu_seconds_per_10k": round(cpu / absorbed * 10_000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.telemetry", description=__doc__)
    p.add_argument("--repository", default="examples/models")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    args = p.parse_args(argv)
    load = load_generator(args.load)
    with tempfile.TemporaryDirectory(prefix="infergate-bench-telemetry-") as tmp:
        on_dir, off_dir = Path(tmp, "on"), Path(tmp, "off")
        on_dir.mkdir()
        off_dir.mkdir()
        repository = Path(args.repository).resolve()
        on = BenchStack(on_dir, repository)  # logs every request
        off = BenchStack(off_dir, repository, ("--no-telemetry",))
        with on, off:
            result = {
                "benchmark": "telemetry",
                "machine": machine(),
                "load_generator": load.name,
                "gateway": overhead(on, off, load, args.rounds, args.seconds),
                "absorb": capacity(on, args.capacity_seconds),
            }
    load.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
