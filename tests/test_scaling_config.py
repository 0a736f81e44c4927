"""`replicas` and `autoscale` in the routing YAML: parsed, and rejected with positions."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from control_plane.config import Autoscale, ConfigError, parse
from control_plane.schema import routing_schema

GOOD = """\
models:
  iris:
    versions:
      v1: {replicas: 2}
      v2: {autoscale: {min: 0, max: 4, target_concurrency: 4, idle: 2m, window: 20s}}
      v3: {endpoints: ["127.0.0.1:9100"]}
    traffic: {v1: 50, v2: 50, v3: 0}
"""


def test_replicas_and_autoscale_are_parsed():
    model = parse(GOOD).models[0]
    assert model.version("v1").replicas == 2 and model.version("v1").endpoints == ()
    assert model.version("v2").autoscale == Autoscale(0, 4, 4.0, idle=120.0, window=20.0)
    assert model.version("v3").replicas is None and model.version("v3").autoscale is None
    assert parse(GOOD.replace("min: 0, max: 4, ", "max: 4, ")).models[0].version(
        "v2"
    ).autoscale == Autoscale(0, 4, 4.0, idle=120.0, window=20.0)
    assert Autoscale().stabilization == 30.0
    jsonschema.validate(yaml.safe_load(GOOD), routing_schema())


@pytest.mark.parametrize(
    "old, new, where",
    [
        (
            "min: 0, max: 4",
            "min: 5, max: 4",
            "5:29: models.iris.versions.v2.autoscale.min: 5 is greater than max 4",
        ),
        (
            "target_concurrency: 4",
            "target_concurrency: 0",
            "5:60: models.iris.versions.v2."
            "autoscale.target_concurrency: must be a number > 0, got 0",
        ),
        ("target_concurrency: 4", "target_concurrency: -2", "target_concurrency: must be a number"),
        (
            "{replicas: 2}",
            "{replicas: 2, autoscale: {max: 2}}",
            "4:25: models.iris.versions.v1: give 'replicas' or 'autoscale', not both",
        ),
        ("{replicas: 2}", "{}", "4:7: models.iris.versions.v1: needs 'endpoints'"),
        (
            "{replicas: 2}",
            "{replicas: -1}",
            "4:22: models.iris.versions.v1.replicas: must be a non-negative integer",
        ),
        ("{replicas: 2}", '{replicas: 2, endpoints: ["127.0.0.1:1"]}', "v1: give 'endpoints'"),
    ],
)
def test_invalid_scaling_is_rejected_with_its_position(old, new, where):
    text = GOOD.replace(old, new)
    with pytest.raises(ConfigError) as err:
        parse(text, "f.yaml")
    assert where in str(err.value)
    if "greater than max" in where:
        return  # a cross-field rule: only `infergate validate` checks it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(text), routing_schema())
