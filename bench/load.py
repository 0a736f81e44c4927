"""Closed-loop HTTP load generators: `wrk` when installed, else aiohttp."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from bench.stats import median, percentile

IRIS_PATH = "/v2/models/iris/infer"
IRIS_BODY = json.dumps(
    {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
)

# wrk calls `done` once at the end; it prints one marked JSON line that we parse.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    """One closed-loop run against one URL."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def medians(rounds: list[LoadResult]) -> dict[str, float]:
    """Rounds of one target: median rps and latencies, total errors."""
    return {
        "rps": round(median([r.rps for r in rounds]), 1),
        "p50_ms": round(median([r.p50_ms for r in rounds]), 3),
        "p99_ms": round(median([r.p99_ms for r in rounds]), 3),
        "errors": sum(r.errors for r in rounds),
    }


class WrkLoad:
    """Runs `wrk` with a Lua script that POSTs the iris body and reports percentiles."""

    name = "wrk"

    def __init__(self, binary: str, headers: dict[str, str] | None = None):
        self.binary = binary
        self._dir = tempfile.TemporaryDirectory(prefix="infergate-wrk-")
        self.script = Path(self._dir.name) / "post.lua"
        extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        self.script.write_text(WRK_SCRIPT % IRIS_BODY + extra)

    def run(self, url: str, concurrency: int, seconds: float) -> LoadResult:
        threads = min(concurrency, 2)
        argv = [self.binary, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s"]
        argv += ["--timeout", "10s", "-s", str(self.script), url]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
        data = json.loads(line.removeprefix("WRK_JSON "))
        return LoadResult(
            rps=data["requests"] / (data["duration_us"] / 1e6),
            p50_ms=data["p50_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            requests=data["requests"],
            errors=data["errors"] + data["non2xx"],
        )

    def close(self) -> None:
        self._dir.cleanup()


class AiohttpLoad:
    """`concurrency` asyncio workers, each sending its next request when the last one returns."""

    name = "python-aiohttp"

    def __init__(self, headers: dict[str, str] | None = None):
        self.headers = headers or {}

    def run(self, url: str, concurrency: int, seconds: float) -> LoadResult:
        return asyncio.run(self._run(url, concurrency, seconds))

    async def _run(self, url: str, concurrency: int, seconds: float) -> LoadResult:
        latencies: list[float] = []
        errors = 0
        body = IRIS_BODY.encode()
        headers = {"content-type": "application/json", **self.headers}
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=10)

        async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.perf_counter()
            deadline = started + seconds
            await asyncio.gather(*(worker(session, deadline) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        ms = [x * 1000 for x in latencies]
        return LoadResult(
            rps=len(ms) / elapsed,
            p50_ms=percentile(ms, 50),
            p99_ms=percentile(ms, 99),
            requests=len(ms),
            errors=errors,
        )

    def close(self) -> None:
        pass


def load_generator(prefer: str = "auto", headers: dict[str, str] | None = None):
    """`wrk` if it is on PATH (unless `prefer` is "python"), else the aiohttp generator;
    each request carries `headers` too."""
    binary = shutil.which("wrk")
    if prefer != "python" and binary:
        return WrkLoad(binary, headers)
    if prefer == "wrk":
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    return AiohttpLoad(headers)
