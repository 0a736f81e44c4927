"""`python -m bench`: run the benchmarks and print one JSON document on stdout."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import convergence, gateway_overhead
from bench.load import load_generator
from bench.stack import BenchStack
from bench.stats import emit
from bench.workdir import scratch_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--repository", default="examples/models", help="trained model repository")
    p.add_argument("--quick", action="store_true", help="short smoke run (numbers meaningless)")
    p.add_argument(
        "--load",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk if installed, else Python aiohttp)",
    )
    p.add_argument("--rounds", type=int, help="rounds per overhead measurement (default 3)")
    p.add_argument("--seconds", type=float, help="seconds per overhead run (default 5)")
    p.add_argument("--edits", type=int, help="routing edits for convergence (default 20)")
    return p.parse_args(argv)


def git_revision() -> str:
    """The checked-out commit, with "+dirty" when the work tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    return {
        "git": git_revision(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repository = Path(args.repository)
    if not (repository / "iris" / "v1").is_dir():
        print(f"no iris/v1 in {repository}: run `make model` first", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    edits = args.edits or (3 if args.quick else 20)

    load = load_generator(args.load)
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "load_generator": load.name,
    }
    try:
        with (
            scratch_dir("infergate-bench-") as workdir,
            BenchStack(workdir, repository.resolve()) as stack,
        ):
            print(f"gateway overhead ({load.name}, {rounds} x {seconds:g} s)", file=sys.stderr)
            report["gateway_overhead"] = gateway_overhead.run(
                stack, load, rounds=rounds, seconds=seconds
            )
            # Side by side: kernel file notifications (the default) against polling `stat`.
            report["convergence"] = {}
            for watch in ("notify", "poll"):
                stack.start_control_plane(watch)
                stack.wait_converged()
                print(f"convergence, watch={watch} ({edits} edits)", file=sys.stderr)
                report["convergence"][watch] = convergence.run(stack, edits=edits)
    finally:
        load.close()
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
