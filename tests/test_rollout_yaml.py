"""Round-trip writes of the routing YAML at a rollout's end (control_plane/yaml_edit.py)."""

from __future__ import annotations

import os

import pytest

from control_plane.config import ConfigError, load
from control_plane.yaml_edit import Document, StaleFile, save, write_traffic

ROUTING = """\
# Routing for the test stack.  Comments must survive.
listen: 127.0.0.1:8080
models:
  iris:
    versions:
      v1: {endpoints: [127.0.0.1:9001]}   # the old model
      v2: {endpoints: [127.0.0.1:9002]}
    traffic: {v1: 100}                    # all on v1 for now
    rollout:                              # the canary plan
      canary: v2
      steps: [10, 50]     # two steps
      interval: 10s
    # a note about the next model
  wine:
    versions:
      a: {endpoints: ["127.0.0.1:9101"]}
    timeout: 5s
"""


@pytest.fixture
def routing(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING)
    os.chmod(path, 0o644)
    return path


def test_rollout_end_writes_traffic_keeps_comments_and_layout(routing):
    write_traffic(routing, "iris", {"v1": 0, "v2": 100})
    text = routing.read_text()
    expected = ROUTING.replace("{v1: 100}         ", "{v1: 0, v2: 100}  ").replace(
        "    rollout:                              # the canary plan\n"
        "      canary: v2\n"
        "      steps: [10, 50]     # two steps\n"
        "      interval: 10s\n",
        "",
    )
    assert text == expected
    model = load(routing).models[0]
    assert dict(model.traffic) == {"v1": 0, "v2": 100} and model.rollout is None
    assert oct(routing.stat().st_mode & 0o777) == "0o644"


def test_a_file_changed_since_it_was_read_is_not_clobbered(routing):
    doc = Document(routing)
    doc.set(["models", "iris", "traffic"], {"v1": 90, "v2": 10})
    operator = ROUTING.replace("timeout: 5s", "timeout: 7s")
    routing.write_text(operator)
    with pytest.raises(StaleFile, match="changed since it was read"):
        save(doc)
    assert routing.read_text() == operator
    assert [p.name for p in routing.parent.iterdir()] == ["routing.yaml"]  # no temp file left


def test_an_invalid_result_leaves_the_file_byte_for_byte(routing):
    before = routing.read_bytes()
    doc = Document(routing)
    doc.set(["models", "iris", "traffic"], {"v1": 0, "v9": 100})
    with pytest.raises(ConfigError, match="unknown version 'v9'"):
        save(doc)
    assert routing.read_bytes() == before


def test_general_edits_set_a_path_and_add_a_key(routing):
    doc = Document(routing)
    doc.set(["models", "iris", "traffic", "v1"], 70)
    doc.set(["models", "iris", "traffic", "v2"], 30)
    doc.set(["models", "wine", "traffic"], {"a": 100})
    save(doc)
    text = routing.read_text()
    assert "    traffic: {v1: 70, v2: 30}             # all on v1 for now\n" in text
    assert (
        '      a: {endpoints: ["127.0.0.1:9101"]}\n    timeout: 5s\n    traffic: {a: 100}\n' in text
    )
    assert "# a note about the next model" in text
