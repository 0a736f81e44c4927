"""What recording answers (`serve --record-answers N`) costs: one model server with it off
and one with it on, under the same wrk load (every request with its own x-request-id),
interleaved rounds, medians. Prints JSON.

    python -m bench.answer_recording [--seconds 6] [--repeat 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.model_server.__main__ import BODY, _check, _median, _port
from bench.model_server.servers import start_infergate, train_iris
from bench.model_server.wrk import run_wrk
from bench.stats import emit

# a fresh x-request-id per request, as Envoy gives; the same script for both configurations
UNIQUE_IDS = """
local n = 0
request = function()
  n = n + 1
  local headers = {["Content-Type"] = "application/json", ["x-request-id"] = "r" .. n}
  return wrk.format(nil, nil, headers)
end
"""
CONFIGURATIONS = {"off": {}, "on": {"record_answers": 10_000}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.answer_recording", description=__doc__)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGURATIONS}
    with tempfile.TemporaryDirectory(prefix="bench-answers-") as tmp:
        workdir = Path(tmp)
        repo = train_iris(workdir)
        for _ in range(args.repeat):  # rounds interleave configurations against drifting noise
            for name, options in CONFIGURATIONS.items():
                server = start_infergate(repo, _port(), workdir, max_batch_size=None, **options)
                try:
                    _check(server.infer_url)
                    wrk = {"connections": args.concurrency, "lua": UNIQUE_IDS}
                    run_wrk(server.infer_url, BODY, workdir, seconds=2, **wrk)  # warm-up
                    run = run_wrk(server.infer_url, BODY, workdir, seconds=args.seconds, **wrk)
                    runs[name].append(run)
                    print(name, run, file=sys.stderr)
                    time.sleep(1)
                finally:
                    server.stop()
    results = {name: _median(cell) for name, cell in runs.items()}
    off, on = results["off"], results["on"]
    report = {
        "setup": f"iris v1 unbatched, 1 process, wrk -t1 -c{args.concurrency}, "
        f"{args.seconds}s x {args.repeat} interleaved rounds, unique x-request-id per request",
        "results": results,
        "on_over_off": {
            "rps": round(on["rps"] / off["rps"], 3),
            "p50": round(on["p50_ms"] / off["p50_ms"], 3),
            "p99": round(on["p99_ms"] / off["p99_ms"], 3),
        },
    }
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
