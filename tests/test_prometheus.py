"""Debian's Prometheus scrapes a running stack with examples/prometheus.yml (its targets
moved to the test's ports) and answers the per-version request rate over its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from gateway.processes import Child, free_port, wait_http
from tests.stack import LoadLoop, Stack, get_json

PROMETHEUS = "/usr/bin/prometheus"
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "infergate.json"
RATE = 'sum by (version) (rate(infergate_requests_total{model="iris",code_class="2xx"}[5s]))'


def prometheus_config(stack: Stack) -> dict:
    """The example config, scraping every second at this stack's ports."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["infergate-control-plane"]["static_configs"] = [{"targets": [f"127.0.0.1:{stack.admin}"]}]
    models = [f"127.0.0.1:{p}" for ports in stack.model_ports.values() for p in ports]
    jobs["infergate-model-servers"]["static_configs"] = [{"targets": models}]
    return config


def test_prometheus_reads_the_per_version_request_rate(tmp_path, model_repository, envoy_binary):
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: apt-get install prometheus")
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1, "v2": 1})
    prometheus = None
    try:
        stack.start_all({"v1": 50, "v2": 50})
        stack.apply({"v1": 50, "v2": 50}, shadow=("v2", 10))
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(stack)))
        port = free_port()
        argv = [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True)
        assert check.returncode == 0, check.stderr
        prometheus = Child("prometheus", argv, str(tmp_path / "prometheus.log")).start()
        wait_http(f"http://127.0.0.1:{port}/-/ready", child=prometheus)
        url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(RATE)}"
        deadline = time.monotonic() + 60
        with LoadLoop(stack.listen):
            while time.monotonic() < deadline:
                result = get_json(url)["data"]["result"]
                rates = {r["metric"]["version"]: float(r["value"][1]) for r in result}
                if set(rates) == {"v1", "v2"} and min(rates.values()) > 0:
                    break
                time.sleep(0.5)
        assert set(rates) == {"v1", "v2"} and min(rates.values()) > 0, json.dumps(result)
        up = get_json(f"http://127.0.0.1:{port}/api/v1/query?query=up")["data"]["result"]
        assert sorted((r["metric"]["job"], r["value"][1]) for r in up) == [
            ("infergate-control-plane", "1"),
            ("infergate-model-servers", "1"),
            ("infergate-model-servers", "1"),
        ]
        # Every query of the Grafana dashboard runs and finds data in this Prometheus.
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "5s").replace("$model", ".*")
                query = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
                answer = get_json(query)
                assert answer["status"] == "success", (panel["title"], answer)
                assert answer["data"]["result"], f"no data for {panel['title']!r}: {expr}"
    finally:
        if prometheus:
            prometheus.stop()
        stack.stop()
