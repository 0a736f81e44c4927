"""Reading a file model by model (and reusing unchanged models) gives exactly what reading
it as one document gives: the same config, the same errors."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from control_plane import config, model_blocks
from tests.test_churn_scale import ScaleConfig


def whole(text: str) -> config.RoutingConfig:
    """The file read as one document (the reference)."""
    return config._parse_root(config._compose(text, "r.yaml"), "r.yaml", config._read_models_node)


def problems(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "r.yaml")
    return [str(p) for p in info.value.problems]


def test_random_one_model_edits_parse_as_the_whole_file_does():
    rng = random.Random(7)
    generator = ScaleConfig(rng, SimpleNamespace(listen=8080, model_ports={"v1": [9001, 9002]}))
    for _ in range(30):
        text = generator.edit()
        assert model_blocks.split(text) is not None
        assert config.parse(text, "r.yaml") == whole(text)
    again = config.parse(generator.edit(), "r.yaml")  # one model changed: the rest reused
    before = {m.name: m for m in whole(text).models}
    reused = [m for m in again.models if m == before.get(m.name)]
    assert len(reused) >= len(again.models) - 1
    assert all(
        m is config.parse(generator.text(), "r.yaml").models[i] for i, m in enumerate(again.models)
    )
    defaults = text.replace(
        "resilience: {health_check: false}", "resilience: {load_balancing: round_robin}"
    )
    assert config.parse(defaults, "r.yaml") == whole(defaults)  # new defaults: read again


BASE = """\
listen: 127.0.0.1:8080
models:
  iris:
    versions:
      v1: {endpoints: [127.0.0.1:9001]}
  # a comment between models
  wine:
    versions:
      v1: {endpoints: [127.0.0.1:9002]}
    traffic: {v1: 100}
"""


def test_the_blocks_keep_their_lines():
    head, blocks = model_blocks.split(BASE)
    assert [(b.name, b.line) for b in blocks] == [("iris", 2), ("wine", 6)]
    assert head.splitlines()[1] == "models: {}" and len(head.splitlines()) == 10


@pytest.mark.parametrize(
    "text",
    [
        BASE.replace("  wine:", "  iris:"),  # a name twice
        BASE.replace("models:\n", "models: &m\n"),  # an anchor
        "listen: 127.0.0.1:8080\nmodels: {iris: {versions: {v1: {endpoints: []}}}}\n",
        BASE.replace("    versions:\n      v1: {endpoints: [127.0.0.1:9001]}", "\tversions: {}"),
        BASE + "---\nmodels: {}\n",
    ],
)
def test_other_layouts_are_read_as_one_document(text):
    assert model_blocks.split(text) is None


def test_an_error_in_a_reused_file_has_the_whole_files_position():
    config.parse(BASE, "r.yaml")  # both models cached
    broken = BASE.replace("traffic: {v1: 100}", "traffic: {v1: -5}")
    assert problems(broken) == [
        "r.yaml:10:19: models.wine.traffic.v1: weight must be a non-negative integer, got -5"
    ]
