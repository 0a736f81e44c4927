"""python -m bench.model_server: requests/s, p50 and p99 of infergate vs MLServer (JSON out).

Both serve the iris logistic regression trained by examples/train_iris.py; wrk drives each
configuration at each concurrency with one keep-alive connection per concurrent request.
MLServer runs from its own virtualenv, created on first use (bench/.venvs/mlserver).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.model_server.mlserver_env import ensure_mlserver
from bench.model_server.servers import Running, start_infergate, start_mlserver, train_iris
from bench.model_server.wrk import run_wrk
from bench.stats import emit

BODY = json.dumps(
    {
        "inputs": [
            {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(url: str) -> None:
    """One request must answer class 0, or the numbers mean nothing."""
    request = urllib.request.Request(
        url, data=BODY.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["outputs"][0]["data"] == [0], body


def configurations(repo: Path, mlserver: Path, workdir: Path) -> dict[str, Callable[[], Running]]:
    model = repo / "iris" / "v1" / "model.joblib"
    return {
        "infergate": lambda: start_infergate(repo, _port(), workdir, max_batch_size=None),
        "infergate-batched": lambda: start_infergate(repo, _port(), workdir, max_batch_size=32),
        "infergate-batched-2proc": lambda: start_infergate(
            repo, _port(), workdir, max_batch_size=32, processes=2
        ),
        "mlserver": lambda: start_mlserver(
            mlserver, model, (_port(), _port(), _port()), workdir, parallel_workers=1
        ),
        "mlserver-inprocess": lambda: start_mlserver(
            mlserver, model, (_port(), _port(), _port()), workdir, parallel_workers=0
        ),
        "mlserver-2workers": lambda: start_mlserver(
            mlserver, model, (_port(), _port(), _port()), workdir, parallel_workers=2
        ),
        "mlserver-batched": lambda: start_mlserver(
            mlserver,
            model,
            (_port(), _port(), _port()),
            workdir,
            parallel_workers=1,
            max_batch_size=32,
            max_batch_time=0.002,
        ),
    }


def _best(results: dict[str, dict[str, Any]], prefix: str, concurrency: str) -> tuple[str, dict]:
    name = max(
        (n for n in results if n.split("-")[0] == prefix),
        key=lambda n: results[n][concurrency]["rps"],
    )
    return name, results[name][concurrency]


def _median(cell: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median requests/s (its latencies belong to it), plus all rps."""
    ordered = sorted(cell, key=lambda r: r["rps"])
    return {**ordered[(len(ordered) - 1) // 2], "rps_runs": [r["rps"] for r in cell]}


def summary(results: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in map(str, concurrencies):
        ours_name, ours = _best(results, "infergate", c)
        theirs_name, theirs = _best(results, "mlserver", c)
        out[c] = {
            "one_worker_rps_ratio": round(
                results["infergate"][c]["rps"] / results["mlserver"][c]["rps"], 2
            ),
            "best": {"infergate": ours_name, "mlserver": theirs_name},
            "best_rps_ratio": round(ours["rps"] / theirs["rps"], 2),
            "best_p99_ms": {"infergate": ours["p99_ms"], "mlserver": theirs["p99_ms"]},
            "batching_speedup": round(
                results["infergate-batched"][c]["rps"] / results["infergate"][c]["rps"], 2
            ),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_server", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--mlserver",
        type=Path,
        help="an mlserver executable (default: installed on first use into bench/.venvs)",
    )
    parser.add_argument("--only", nargs="*", help="configuration names to run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over all configurations; report medians"
    )
    args = parser.parse_args(argv)
    mlserver = args.mlserver or ensure_mlserver()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-server-") as tmp:
        workdir = Path(tmp)
        repo = train_iris(workdir)
        for _ in range(args.repeat):  # rounds interleave configurations against drifting noise
            for name, start in configurations(repo, mlserver, workdir).items():
                if args.only and name not in args.only:
                    continue
                server = start()
                try:
                    _check(server.infer_url)
                    run_wrk(server.infer_url, BODY, workdir, connections=16, seconds=2)  # warm-up
                    for c in args.concurrency:
                        run = run_wrk(
                            server.infer_url, BODY, workdir, connections=c, seconds=args.seconds
                        )
                        runs.setdefault(name, {}).setdefault(str(c), []).append(run)
                        print(name, c, run, file=sys.stderr)
                        time.sleep(1)
                finally:
                    server.stop()
    results = {name: {c: _median(cell) for c, cell in by_c.items()} for name, by_c in runs.items()}
    report: dict[str, Any] = {
        "seconds": args.seconds,
        "repeat": args.repeat,
        "load_generator": "wrk -t1, keep-alive, 1-row FP64 JSON request",
        "results": results,
    }
    if not args.only:
        report["summary"] = summary(results, args.concurrency)
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
