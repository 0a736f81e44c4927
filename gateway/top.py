"""`infergate top`: the control plane's live traffic view in the terminal (rich);
`infergate usage`: requests and rejections per consumer and model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def fetch(admin_url: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin_url.rstrip("/") + path, timeout=5) as resp:
        return json.load(resp)


def _num(value: float | None, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{unit}"


# /traffic's outcomes -> column headings
USAGE_COLUMNS = {
    "ok": "ok",
    "unauthorized": "401",
    "forbidden": "403",
    "too_large": "413",
    "rate_limited": "429 rate",
    "over_quota": "429 quota",
    "shed": "shed",
    "client_error": "other 4xx",
    "error": "errors",
}


def _count(n: float) -> str:
    """A (possibly scaled-up, so fractional) request count."""
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def usage_table(consumers: list[dict[str, Any]], window: str) -> Table:
    """Requests and outcomes per consumer and model, in `window` ("10s", "60s") or
    since start ("total")."""
    span = "since start" if window == "total" else f"last {window}"
    table = Table(title=f"usage per consumer ({span})", expand=True)
    for column in ("consumer", "model", "requests", *USAGE_COLUMNS.values()):
        table.add_column(column, justify="left" if column in ("consumer", "model") else "right")
    for row in consumers:
        counts = row["total"] if window == "total" else row["windows"][window]
        outcomes = counts["outcomes"]
        table.add_row(
            row["consumer"],
            row["model"],
            _count(counts["requests"]),
            *(_count(outcomes[kind]) for kind in USAGE_COLUMNS),
        )
    return table


def render(traffic: dict[str, Any], status: dict[str, Any]) -> Group:
    """One frame: a table of versions, the config error if any, the Envoys and the
    usage per consumer."""
    table = Table(title="traffic (10 s window; 60 s in brackets)", expand=True)
    for column in ("model", "version", "weight", "shadow", "req/s", "errors", "p50", "p99", "conc"):
        table.add_column(column, justify="left" if column in ("model", "version") else "right")
    for model, entry in traffic["models"].items():
        for version, row in entry["versions"].items():
            w10, w60 = row["windows"]["10s"], row["windows"]["60s"]
            table.add_row(
                model,
                version,
                "-" if row["weight"] is None else f"{row['weight']}",
                _num(row["shadow_percent"], 0, unit="%"),
                f"{_num(w10['requests_per_second'])} ({_num(w60['requests_per_second'])})",
                f"{_num(w10['error_rate'], 3)} ({_num(w60['error_rate'], 3)})",
                _num(w10["p50"], 1, 1000, " ms"),
                _num(w10["p99"], 1, 1000, " ms"),
                _num(w10["concurrency"], 2),
            )
    parts: list[Any] = [table]
    if traffic["sample_fraction"] < 1:
        parts.append(Text(f"Envoy logs {traffic['sample_fraction']:.2%} of requests", "yellow"))
    error = status["config"].get("error")
    if error:
        parts.append(Text(f"config error (last good config serving):\n{error['message']}", "red"))
    nodes = Table(title="Envoys", expand=True)
    for column in ("node", "mode", "connected", "rds ACKed", "last NACK"):
        nodes.add_column(column)
    for node in status["nodes"]:
        nacks = [f"{t}: {s['nack']['message'][:60]}" for t, s in node["types"].items() if s["nack"]]
        nodes.add_row(
            node["node_id"],
            node.get("mode", "-"),
            "yes" if node["connected"] else "no",
            node["types"].get("rds", {}).get("acked_version") or "-",
            "; ".join(nacks) or "-",
        )
    parts.append(nodes)
    if traffic["consumers"]:
        parts.append(usage_table(traffic["consumers"], "60s"))
    return Group(*parts)


def frame(admin_url: str) -> Group | Text:
    try:
        return render(fetch(admin_url, "/traffic"), fetch(admin_url, "/status"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Text(f"cannot reach the control plane at {admin_url}: {exc}", "red")


def top(admin_url: str, once: bool = False, interval: float = 1.0) -> int:
    console = Console()
    if once:
        console.print(frame(admin_url))
        return 0
    with Live(frame(admin_url), console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(frame(admin_url), refresh=True)
        except KeyboardInterrupt:
            return 0


def usage(admin_url: str, window: str, as_json: bool = False) -> int:
    """Print the usage per consumer and model once."""
    try:
        consumers = fetch(admin_url, "/traffic")["consumers"]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        Console(stderr=True).print(f"cannot reach the control plane at {admin_url}: {exc}")
        return 2
    if as_json:
        print(json.dumps(consumers, indent=2))
    else:
        Console().print(usage_table(consumers, window))
    return 0
