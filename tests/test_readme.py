"""The README stays true: its YAML validates, its error example is the real output, its
commands parse, its make targets exist, and its registration recipe works as written.

Blocks that a test runs carry a marker line `<!-- readme-test: NAME ... -->` right above
them; `block(NAME)` returns the block's text. (Hook for the second-Envoy recipe: mark its
block `second-envoy` and run it with `shell_lines(block("second-envoy"))` here.)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control_plane.config import ConfigError, parse
from gateway.cli import build_parser
from gateway.processes import Child, free_port, wait_http
from tests.stack import get_json

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:<!-- readme-test: (\S+)[^\n]*-->\n)?```(\w*)\n(.*?)```", re.S)
BLOCKS = [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(README)]


def block(name: str) -> str:
    return next(text for marker, _, text in BLOCKS if marker == name)


def shell_lines(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def test_every_yaml_example_validates():
    yamls = [text for _, lang, text in BLOCKS if lang == "yaml"]
    assert len(yamls) >= 3
    for text in yamls:
        if "models:" not in text:  # a fragment of top-level keys (the resilience policy)
            text += "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:9001]}}\n"
        parse(text, "README.md")  # raises ConfigError naming the problem


def test_error_example_is_the_real_output():
    shown = block("error-example").strip()
    routing = (ROOT / "examples" / "routing.yaml").read_text()
    assert "v2: 10}" in routing
    with pytest.raises(ConfigError) as caught:
        parse(routing.replace("v2: 10}", "v2: -5}"), "examples/routing.yaml")
    assert str(caught.value) == shown


def test_every_cli_command_in_the_readme_parses():
    parser = build_parser()
    commands = [
        shlex.split(line, comments=True)
        for _, lang, text in BLOCKS
        if lang == "sh"
        for line in shell_lines(text)
    ]
    cli = [c for c in commands if c and c[0] in ("infergate", ".venv/bin/infergate")]
    assert len(cli) >= 4
    for argv in cli:
        words = [w for w in argv[1:] if w != ">" and not w.endswith(".json")]
        parser.parse_args(words)  # exits (fails the test) on an unknown option
    targets = {c[1] for c in commands if c[0] == "make" and len(c) > 1}
    assert targets >= {"run"}
    for target in targets:
        dry = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True)
        assert dry.returncode == 0, dry.stderr


def test_make_run_installs_only_the_runtime_and_make_test_the_test_extra():
    def dry(target: str) -> str:
        return subprocess.run(
            ["make", "--no-print-directory", "-n", "-B", target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "pip install --quiet -e .\n" in dry("run") and "'.[" not in dry("venv")
    assert "pip install --quiet -e '.[test]'" in dry("test")
    assert "pip install --quiet -e '.[bench]'" in dry("bench-xds")


def test_registration_recipe_works_as_written(tmp_path, model_repository, monkeypatch):
    """The recipe's own lines, on free ports: create the token, start the control plane with
    it (the stand-in for `run`, whose option is the same), register, register by hand."""
    token_line, run_line = shell_lines(block("registration-start"))
    assert run_line == ".venv/bin/infergate run examples/routing.yaml --admin-token-file token"
    bindir = str(Path(sys.executable).parent)
    monkeypatch.chdir(tmp_path)
    subprocess.run(token_line.replace(".venv/bin", bindir), shell=True, check=True)
    assert len((tmp_path / "token").read_text().strip()) == 64

    admin, port, by_hand = free_port(), free_port(), free_port()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "routing.yaml").write_text(
        (ROOT / "examples" / "routing.yaml").read_text()
    )
    plane_line = run_line.replace(".venv/bin/infergate run", "control-plane")
    plane = Child(
        "control plane",
        [sys.executable, "-m", "gateway.cli", *plane_line.split(),
         "--xds", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{admin}"],
    )  # fmt: skip
    serve_line, curl_line = (
        line.replace(".venv/bin", bindir)
        .replace("examples/models", str(model_repository))
        .replace("18001", str(admin))
        .replace("9011", str(port))
        .replace("9012", str(by_hand))
        for line in shell_lines(block("registration"))
    )
    plane.start()
    server = subprocess.Popen(serve_line, shell=True, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{admin}/healthz", child=plane)
        registered = {"model": "iris", "version": "v1", "address": f"127.0.0.1:{port}"}
        deadline = time.monotonic() + 60
        while registered not in get_json(f"http://127.0.0.1:{admin}/endpoints")["endpoints"]:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)
        answer = subprocess.run(curl_line, shell=True, capture_output=True, text=True, check=True)
        assert '"changed": true' in answer.stdout
        os.killpg(server.pid, signal.SIGTERM)  # leaves on exit
        left = [{"model": "iris", "version": "v1", "address": f"127.0.0.1:{by_hand}"}]
        deadline = time.monotonic() + 60  # it drains first, then deregisters
        while get_json(f"http://127.0.0.1:{admin}/endpoints")["endpoints"] != left:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        plane.stop()
