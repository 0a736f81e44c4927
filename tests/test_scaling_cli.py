"""`infergate set-weight / shadow / scale`: round-trip edits of the routing file."""

from __future__ import annotations

import pytest

from control_plane.config import load
from gateway.cli import main

ROUTING = """\
# the iris rollout
models:
  iris:
    versions:
      v1: {replicas: 2}   # kept by infergate run
      v2:
        autoscale: {min: 0, max: 4, target_concurrency: 4}
      v3: {endpoints: ["127.0.0.1:9100"]}
    traffic: {v1: 90, v2: 10, v3: 0}  # weights
"""


@pytest.fixture
def routing(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(ROUTING)
    return path


def test_edits_keep_comments_and_change_only_their_value(routing):
    assert main(["set-weight", str(routing), "iris", "v1=50", "v2=50", "v3=0"]) == 0
    assert main(["shadow", str(routing), "iris", "v3", "5"]) == 0
    assert main(["scale", str(routing), "iris", "v1", "3"]) == 0
    text = routing.read_text()
    for comment in ("# the iris rollout", "# kept by infergate run", "# weights"):
        assert comment in text
    model = load(routing).models[0]
    assert model.traffic == (("v1", 50), ("v2", 50), ("v3", 0))
    assert model.shadow.version == "v3" and model.shadow.percent == 5
    assert model.version("v1").replicas == 3


@pytest.mark.parametrize(
    "argv, why",
    [
        (["set-weight", "iris", "v1=0", "v2=0", "v3=0"], "all weights are zero"),
        (["set-weight", "iris", "v9=100"], "unknown version 'v9'"),
        (["shadow", "iris", "v3", "150"], "must be a number 0-100"),
        (["scale", "iris", "v2", "2"], "give 'replicas' or 'autoscale', not both"),
        (["scale", "iris", "v3", "-1"], "must be a non-negative integer"),
        (["scale", "iris", "v9", "1"], "has no version 'v9' of model 'iris'"),
        (["scale", "nosuch", "v1", "1"], "has no model 'nosuch'"),
    ],
)
def test_an_invalid_edit_leaves_the_file_byte_for_byte_and_says_why(routing, capsys, argv, why):
    before = routing.read_bytes()
    assert main([argv[0], str(routing), *argv[1:]]) == 1
    assert routing.read_bytes() == before
    assert why in capsys.readouterr().err
