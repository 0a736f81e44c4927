"""`python -m bench.api_overhead`: what API management adds to the gateway path.

One stack (iris v1, the control plane, one Envoy); the routing file is switched between
variants by hot reload, and the variants' runs are interleaved round by round. Every
request carries an API key (`x-api-key`), which only the keyed variants check:
- `plain`: the gateway without `consumers` or limits;
- `keys_rate`: key auth plus a per-consumer rate limit (a bucket never emptied);
- `keys_rate_quota`: the same plus a global quota (every request asks the control
  plane's rate limit service; a quota never reached).
Requests/s, p50 and p99 at concurrency 1 and 16; medians over rounds, and each variant's
p50 delta and rps ratio against `plain` per round (then their median). JSON on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import machine
from bench.load import LoadResult, load_generator, medians
from bench.stack import BenchStack
from bench.stats import alternating, emit, median
from bench.workdir import scratch_dir

KEY = "bench-api-key-0000000000000001"
KEYS = "consumers: {keys_file: api-keys.yaml}\n"
RATE = "rate: {per_consumer: 100000/s}"
VARIANTS = {
    "plain": "",
    "keys_rate": f"    limits: {{{RATE}}}\n{KEYS}",
    "keys_rate_quota": f"    limits: {{{RATE}, quota: {{per_consumer: 1000000000/d}}}}\n{KEYS}",
}


def use(stack: BenchStack, variant: str) -> None:
    """Route iris with the variant's limits and wait until Envoy runs them."""
    (stack.workdir / "api-keys.yaml").write_text(f"bench: {KEY}\n")
    before = stack.config.read_text()
    applied = stack.status()["config"]["applied_at"]
    stack.route({"v1": 100})
    text = stack.config.read_text() + VARIANTS[variant]
    tmp = stack.config.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(stack.config)
    deadline = time.monotonic() + 10
    while text != before and stack.status()["config"]["applied_at"] == applied:
        assert time.monotonic() < deadline, "the control plane did not apply the edit"
        time.sleep(0.02)
    stack.wait_converged()


def run(stack: BenchStack, load, rounds: int, seconds: float, concurrencies=(1, 16)) -> dict:
    results: dict[str, Any] = {}
    for c in concurrencies:
        runs: dict[str, list[LoadResult]] = {v: [] for v in VARIANTS}
        for i in range(rounds):
            order = alternating(list(VARIANTS), i)
            for variant in order:
                use(stack, variant)
                load.run(stack.gateway_url, c, min(1.0, seconds))  # warm-up
                result = load.run(stack.gateway_url, c, seconds)
                runs[variant].append(result)
                print(
                    f"  c={c} round {i + 1}/{rounds} {variant:10}: {result.rps:8.1f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms",
                    file=sys.stderr,
                )
        entry: dict[str, Any] = {"concurrency": c}
        for variant, rs in runs.items():
            entry[variant] = medians(rs)
            if variant != "plain":
                pairs = list(zip(runs["plain"], rs, strict=True))
                entry[variant]["p50_delta_ms"] = round(
                    median([r.p50_ms - p.p50_ms for p, r in pairs]), 3
                )
                entry[variant]["rps_over_plain"] = round(
                    median([r.rps / p.rps for p, r in pairs]), 3
                )
        entry["rounds"] = {v: [r.as_dict() for r in rs] for v, rs in runs.items()}
        results[f"c{c}"] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_overhead", description=__doc__)
    p.add_argument("--repository", default="examples/models", help="trained model repository")
    p.add_argument("--quick", action="store_true", help="short smoke run (numbers meaningless)")
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--seconds", type=float, help="seconds per run (default 5)")
    args = p.parse_args(argv)
    repository = Path(args.repository).resolve()
    if not (repository / "iris" / "v1").is_dir():
        print(f"no iris/v1 in {repository}: run `make model` first", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    load = load_generator(args.load, {"x-api-key": KEY})
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "load_generator": load.name,
        "rounds": rounds,
        "seconds_per_run": seconds,
    }
    try:
        with scratch_dir("infergate-bench-api-") as workdir, BenchStack(workdir, repository) as s:
            report["results"] = run(s, load, rounds, seconds)
    finally:
        load.close()
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
