"""Routing YAML validation: every error names file, line, field and what is wrong."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from control_plane.config import ConfigError, Shadow, load, parse, parse_endpoint
from control_plane.resilience import Resilience
from control_plane.schema import routing_schema

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "routing.yaml"

BASE = """\
models:
  iris:
    versions:
      v1: {endpoints: [127.0.0.1:9001]}
      v2: {endpoints: [127.0.0.1:9002]}
    traffic: {v1: 90, v2: 10}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, "r.yaml")
    return [str(p) for p in info.value.problems]


def test_example_is_valid_and_typed():
    config = load(EXAMPLE)
    (iris,) = config.models
    assert [v.name for v in iris.versions] == ["v1", "v2", "v3"]
    assert dict(iris.traffic) == {"v1": 90, "v2": 10}
    assert iris.shadow.version == "v3" and iris.shadow.percent == 25
    assert iris.pin_header == "x-model-version"
    assert str(config.listen) == "127.0.0.1:8080"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE.replace("v2: 10}", "v9: 10}"),
            "r.yaml:6:23: models.iris.traffic.v9: unknown version 'v9'",
        ),
        (
            BASE.replace("v2: 10}", "v2: -1}"),
            "r.yaml:6:27: models.iris.traffic.v2: weight must be a non-negative integer, got -1",
        ),
        (
            BASE.replace("v2: 10}", "v2: 2.5}"),
            "r.yaml:6:27: models.iris.traffic.v2: weight must be a non-negative integer, got 2.5",
        ),
        (
            BASE.replace("{v1: 90, v2: 10}", "{v1: 0, v2: 0}"),
            "r.yaml:6:14: models.iris.traffic: all weights are zero",
        ),
        (
            BASE + "    shadow: {version: v2, percent: 150}\n",
            "r.yaml:7:36: models.iris.shadow.percent: must be a number 0-100, got 150",
        ),
        (
            BASE + "    shadow: {version: v7, percent: 5}\n",
            "r.yaml:7:23: models.iris.shadow.version: unknown version 'v7'",
        ),
        (
            BASE.replace("127.0.0.1:9002", "localhost:9002"),
            "r.yaml:5:24: models.iris.versions.v2.endpoints[0]: 'localhost:9002' is not 'ip:port'",
        ),
        (
            BASE.replace("127.0.0.1:9002", "127.0.0.1:0"),
            "r.yaml:5:24: models.iris.versions.v2.endpoints[0]: '127.0.0.1:0' needs a port",
        ),
        (BASE + "    colour: blue\n", "r.yaml:7:5: models.iris.colour: unknown key 'colour'"),
        ("listen: 127.0.0.1:8080\nmodel: {}\n", "r.yaml:2:1: model: unknown key 'model'"),
        (
            BASE.replace("    traffic: {v1: 90, v2: 10}\n", ""),
            "r.yaml:2:3: models.iris: has several versions, so 'traffic' must give their weights",
        ),
        (
            BASE.replace("v1: {endpoints", "V1: {endpoints"),
            "r.yaml:4:7: models.iris.versions.V1: version name 'V1' must be lowercase",
        ),
        (
            "models:\n  iris:\n    versions: {v1: {endpoints: [1.2.3.4:1]}\n",
            "r.yaml:4:1: invalid YAML",
        ),
        ("", "r.yaml:1:1: the file is empty"),
    ],
)
def test_each_error_is_positioned_and_explained(text, expected):
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_reported_together():
    text = BASE.replace("v2: 10}", "v2: -1}") + "    shadow: {version: v7, percent: 5}\n"
    assert len(problems(text)) == 2


def test_single_version_defaults_to_all_traffic():
    config = parse("models:\n  m:\n    versions:\n      a: {endpoints: [127.0.0.1:1]}\n")
    assert config.models[0].traffic == (("a", 100),)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load(tmp_path / "nope.yaml")


def test_json_schema_accepts_the_example_and_rejects_unknown_keys():
    schema = routing_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(EXAMPLE.read_text()), schema)
    bad = yaml.safe_load(BASE + "    colour: blue\n")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(BASE.replace("v2: 10}", "v2: -1}")), schema)
    policy = "resilience:\n  retries: {attempts: 3, conditions: [reset]}\n  health_check: false\n"
    jsonschema.validate(yaml.safe_load(policy + BASE), schema)
    parse(policy + BASE)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load("resilience: {load_balancing: magic}\n" + BASE), schema)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("retries: {conditions: [bogus]}", "resilience.retries.conditions: unknown retry"),
        ("retries: {attempts: -1}", "resilience.retries.attempts: must be a non-negative"),
        ("load_balancing: magic", "resilience.load_balancing: 'magic' is not one of"),
        ("health_check: {interval: soon}", "resilience.health_check.interval: 'soon' is not"),
        ("health_check: maybe", "resilience.health_check: must be a mapping, or false"),
        ("circuit_breakers: {max_requestz: 1}", "unknown key 'max_requestz'"),
    ],
)
def test_resilience_errors(block, expected):
    found = problems(f"resilience:\n  {block}\n" + BASE)
    assert any(expected in p and p.startswith("r.yaml:2:") for p in found), found


def test_grpc_listen_needs_grpc_endpoints_and_a_free_address():
    text = BASE.replace("    traffic:", "    grpc_listen: 127.0.0.1:8081\n    traffic:")
    found = problems(text)
    assert any("models.iris.versions.v1: the model has grpc_listen" in p for p in found), found
    ok = text.replace("[127.0.0.1:9001]}", "[127.0.0.1:9001], grpc_endpoints: [127.0.0.1:9101]}")
    ok = ok.replace("[127.0.0.1:9002]}", "[127.0.0.1:9002], grpc_endpoints: [127.0.0.1:9102]}")
    model = parse(ok).models[0]
    assert str(model.grpc_listen) == "127.0.0.1:8081"
    assert [str(e) for e in model.version("v2").grpc_endpoints] == ["127.0.0.1:9102"]
    clash = "listen: 127.0.0.1:8081\n" + ok
    assert any("already used by listen" in p for p in problems(clash))


ROLLOUT = BASE.replace("{v1: 90, v2: 10}", "{v1: 100}") + "    rollout: {canary: v2%s}\n"


def test_rollout_block_in_the_issues_shape_is_typed():
    block = (
        ", shadow: {percent: 50, min_pairs: 300, min_agreement: 0.99}, steps: [10, 25, 50, 100],"
        " interval: 10s, min_requests: 100, max_error_rate: 0.01, max_p99: 500ms,"
        " max_p99_ratio: 1.5, failure_limit: 1, hold_timeout: 2m"
    )
    text = ROLLOUT % block
    rollout = parse(text).models[0].rollout
    assert (rollout.canary, rollout.baseline, rollout.steps) == ("v2", "v1", (10, 25, 50, 100))
    assert (rollout.interval, rollout.max_p99, rollout.hold_limit) == (10.0, 0.5, 120.0)
    assert (rollout.shadow.percent, rollout.shadow.min_pairs, rollout.shadow.rtol) == (
        50,
        300,
        1e-5,
    )
    jsonschema.validate(yaml.safe_load(text), routing_schema())
    assert parse(ROLLOUT % ", interval: 30s").models[0].rollout.hold_limit == 300.0


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (", steps: [10, 10, 50]", "r.yaml:7:34: models.iris.rollout.steps: must be increasing"),
        (", steps: [0, 50]", "r.yaml:7:35: models.iris.rollout.steps: must be an integer 1-100"),
        (", steps: [50, 101]", "r.yaml:7:39: models.iris.rollout.steps: must be an integer 1-100"),
        (", steps: []", "r.yaml:7:34: models.iris.rollout.steps: needs at least one step"),
        (", interval: 0s", "r.yaml:7:37: models.iris.rollout.interval: '0s' is not a positive"),
        (", interval: -5s", "r.yaml:7:37: models.iris.rollout.interval: '-5s' is not a positive"),
        (", max_error_rate: 1.5", "r.yaml:7:43: models.iris.rollout.max_error_rate: must be a"),
        (", max_p99_ratio: 0.9", "r.yaml:7:42: models.iris.rollout.max_p99_ratio: must be a"),
        (", min_requests: 0", "r.yaml:7:41: models.iris.rollout.min_requests: must be an integer"),
        (", failure_limit: 0", "r.yaml:7:42: models.iris.rollout.failure_limit: must be an"),
        (", max_p99: fast", "r.yaml:7:36: models.iris.rollout.max_p99: 'fast' is not a positive"),
        (", hold_timeout: 1s", "r.yaml:7:41: models.iris.rollout.hold_timeout: must be at least"),
        (", shadow: {min_agreement: 1.2}", "r.yaml:7:51: models.iris.rollout.shadow.min_agreement"),
        (", shadow: {percent: 0}", "r.yaml:7:45: models.iris.rollout.shadow.percent: must be a"),
        (", speed: 3", "r.yaml:7:27: models.iris.rollout.speed: unknown key 'speed'"),
    ],
)
def test_rollout_errors_are_positioned(block, expected):
    found = problems(ROLLOUT % block)
    assert any(p.startswith(expected) for p in found), found


def test_rollout_canary_must_be_a_known_version_other_than_the_baseline():
    unknown = problems(ROLLOUT.replace("canary: v2", "canary: v9") % "")
    assert any(
        p.startswith("r.yaml:7:23: models.iris.rollout.canary: unknown version 'v9'")
        for p in unknown
    )
    same = problems(ROLLOUT.replace("canary: v2", "canary: v1") % "")
    assert any("'v1' already has all the traffic, so it equals the baseline" in p for p in same), (
        same
    )
    three = BASE.replace("v2: 10}", "v2: 10, v3: 5}").replace(
        "    traffic", "      v3: {endpoints: [127.0.0.1:9003]}\n    traffic"
    )
    two_baselines = problems(three + "    rollout: {canary: v3}\n")
    assert any("needs one baseline, but traffic gives weight to v1, v2" in p for p in two_baselines)
    assert parse(BASE + "    rollout: {canary: v2}\n").models[0].rollout.baseline == "v1"


NEEDS_SERVERS = (
    "needs 'endpoints' (servers started elsewhere), or 'replicas' or 'autoscale' (servers "
    "that infergate run starts)"
)


def version_without(key: str) -> str:
    return BASE.replace("v2: {endpoints: [127.0.0.1:9002]}", f"v2: {{{key}: [127.0.0.1:9102]}}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  iris: {traffic: {v1: 100}}\n",
            ["r.yaml:2:3: models.iris: missing required key 'versions'"],
        ),
        (
            version_without("grpc_endpoints"),
            [
                "r.yaml:5:7: models.iris.versions.v2: " + NEEDS_SERVERS,
                "r.yaml:6:23: models.iris.traffic.v2: unknown version 'v2' (versions: v1)",
            ],
        ),
        (
            "models:\n  iris:\n    versions: [v1]\n",
            ["r.yaml:3:15: models.iris.versions: expected a mapping"],
        ),
        (
            BASE.replace("{v1: 90, v2: 10}", "[v1]"),
            ["r.yaml:6:14: models.iris.traffic: expected a mapping"],
        ),
        (
            "models:\n  Iris: {}\n  b_: {}\n",
            [
                f"r.yaml:{line}:3: models.{name}: model name {name!r} must be lowercase "
                "letters, digits, '-' or '_' (at most 63, starting and ending with a letter or "
                "digit)"
                for line, name in ((2, "Iris"), (3, "b_"))
            ],
        ),
        (
            BASE.replace("{endpoints: [127.0.0.1:9001]}", "{}").replace(
                "{endpoints: [127.0.0.1:9002]}", "{}"
            ),
            [
                "r.yaml:4:7: models.iris.versions.v1: " + NEEDS_SERVERS,
                "r.yaml:5:7: models.iris.versions.v2: " + NEEDS_SERVERS,
                "r.yaml:6:15: models.iris.traffic.v1: unknown version 'v1' (versions: )",
                "r.yaml:6:23: models.iris.traffic.v2: unknown version 'v2' (versions: )",
            ],
        ),
        (
            "models:\n  iris:\n    versions: {}\n",
            ["r.yaml:3:15: models.iris.versions: needs at least one version"],
        ),
        (
            BASE.replace("[127.0.0.1:9002]}", "[127.0.0.1:9002], colour: red}"),
            [
                "r.yaml:5:41: models.iris.versions.v2.colour: unknown key 'colour' "
                "(expected one of: autoscale, endpoints, grpc_endpoints, replicas)"
            ],
        ),
        (
            BASE.replace("[127.0.0.1:9002]", "127.0.0.1:9002"),
            ["r.yaml:5:23: models.iris.versions.v2.endpoints: expected a list"],
        ),
        (
            BASE + "    pin_header: X_Version\n",
            ["r.yaml:7:17: models.iris.pin_header: 'X_Version' is not a header name"],
        ),
        (
            BASE + "    pin_header: 5\n",
            ["r.yaml:7:17: models.iris.pin_header: 5 is not a header name"],
        ),
        (
            BASE + "    pin_header: [x-a]\n",
            [
                "r.yaml:7:17: models.iris.pin_header: expected a single value, not a list or "
                "mapping",
                "r.yaml:7:17: models.iris.pin_header: None is not a header name",
            ],
        ),
        (
            BASE + "    timeout: soon\n",
            [
                "r.yaml:7:14: models.iris.timeout: 'soon' is not a positive duration like "
                "500ms, 30s, 2m"
            ],
        ),
        (
            BASE + "    resilience: {load_balancing: magic}\n",
            [
                "r.yaml:7:34: models.iris.resilience.load_balancing: 'magic' is not one of: "
                "least_request, round_robin, random, orca_weighted"
            ],
        ),
        (
            BASE.replace("    traffic:", "    grpc_listen: nowhere\n    traffic:").replace(
                "v1: {endpoints: [127.0.0.1:9001]}", "v1: {endpoints: [], grpc_endpoints: []}"
            ),
            [
                "r.yaml:5:7: models.iris.versions.v2: the model has grpc_listen, so each "
                "version needs grpc_endpoints",
                "r.yaml:6:18: models.iris.grpc_listen: 'nowhere' is not 'ip:port' with an IP "
                "address",
            ],
        ),
        (
            BASE.replace("{v1: 90, v2: 10}", "{}"),
            ["r.yaml:6:14: models.iris.traffic: needs at least one version with a positive weight"],
        ),
        (
            BASE.replace("v2: 10}", "v9: 10}"),
            ["r.yaml:6:23: models.iris.traffic.v9: unknown version 'v9' (versions: v1, v2)"],
        ),
        (
            BASE.replace("v2: 10}", "v2: [10]}"),
            [
                "r.yaml:6:27: models.iris.traffic.v2: expected a single value, not a list or "
                "mapping",
                "r.yaml:6:27: models.iris.traffic.v2: weight must be a non-negative integer, "
                "got None",
            ],
        ),
        (
            BASE + "    shadow: {version: v2}\n",
            ["r.yaml:7:13: models.iris.shadow: missing required key 'percent'"],
        ),
        (
            BASE + "    shadow: {percent: 5}\n",
            ["r.yaml:7:13: models.iris.shadow: missing required key 'version'"],
        ),
        (BASE + "    shadow: [v2]\n", ["r.yaml:7:13: models.iris.shadow: expected a mapping"]),
        (
            BASE + "    shadow: {version: v2, percent: 5, colour: red}\n",
            [
                "r.yaml:7:39: models.iris.shadow.colour: unknown key 'colour' (expected one "
                "of: percent, version)"
            ],
        ),
        (
            BASE + "    shadow: {version: [v2], percent: 5}\n",
            [
                "r.yaml:7:23: models.iris.shadow.version: expected a single value, not a "
                "list or mapping",
                "r.yaml:7:23: models.iris.shadow.version: unknown version None",
            ],
        ),
        (
            BASE + "    shadow: {version: v2, percent: [5]}\n",
            [
                "r.yaml:7:36: models.iris.shadow.percent: expected a single value, not a "
                "list or mapping",
                "r.yaml:7:36: models.iris.shadow.percent: must be a number 0-100, got None",
            ],
        ),
        *[
            (
                BASE + f"    shadow: {{version: v2, percent: {bad}}}\n",
                [f"r.yaml:7:36: models.iris.shadow.percent: must be a number 0-100, got {shown}"],
            )
            for bad, shown in (("true", "True"), ("-0.5", "-0.5"), ("100.5", "100.5"))
        ],
        (
            "models:\n  - a\n b: 1\n",
            ["r.yaml:3:2: invalid YAML: did not find expected key"],
        ),
        ("", ["r.yaml:1:1: the file is empty"]),
        ("- 1\n", ["r.yaml:1:1: expected a mapping"]),
        ("listen: 127.0.0.1:8080\n", ["r.yaml:1:1: missing required key 'models'"]),
        ("listen: 8080\nmodels: {}\n", ["r.yaml:1:9: listen: expected 'ip:port', got 8080"]),
        ("models: [iris]\n", ["r.yaml:1:9: models: expected a mapping"]),
        (
            "listen: 127.0.0.1:8080\nmodel: {}\n",
            [
                "r.yaml:2:1: model: unknown key 'model' (expected one of: consumers, listen, "
                "models, quota_service, resilience, upstream_tls)",
                "r.yaml:1:1: missing required key 'models'",
            ],
        ),
    ],
)
def test_every_problem_is_listed_exactly(text, expected):
    assert problems(text) == expected


def test_a_model_without_options_gets_the_defaults():
    config = parse(BASE)
    (iris,) = config.models
    assert str(config.listen) == "127.0.0.1:8080"
    assert iris.shadow is None and iris.grpc_listen is None
    assert iris.pin_header == "x-model-version" and iris.timeout == 30.0
    assert iris.resilience == Resilience()
    assert iris.version("v2").endpoints == (parse_endpoint("127.0.0.1:9002"),)


def test_model_options_are_read():
    text = BASE + "    pin_header: x-pin\n    timeout: 1500ms\n"
    text += "    shadow: {version: v2, percent: 0}\n    resilience: {load_balancing: random}\n"
    (iris,) = parse(text).models
    assert (iris.pin_header, iris.timeout, iris.shadow) == ("x-pin", 1.5, Shadow("v2", 0.0))
    assert iris.resilience.load_balancing == "random"
    full = parse(BASE + "    shadow: {version: v2, percent: 100}\n").models[0].shadow
    assert full == Shadow("v2", 100.0)


def test_grpc_listen_clash_between_models_names_both():
    grpc = BASE.replace("[127.0.0.1:9001]}", "[127.0.0.1:9001], grpc_endpoints: [127.0.0.1:9101]}")
    grpc = grpc.replace("[127.0.0.1:9002]}", "[127.0.0.1:9002], grpc_endpoints: [127.0.0.1:9102]}")
    one = grpc.replace("    traffic:", "    grpc_listen: 127.0.0.1:8081\n    traffic:")
    two = one.replace("  iris:", "  other:").replace("models:\n", "")
    assert problems(one + two) == [
        "r.yaml:2:3: models.other.grpc_listen: 127.0.0.1:8081 is already used by "
        "models.iris.grpc_listen"
    ]


def test_files_name_themselves_in_problems(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert [str(p) for p in info.value.problems] == [
        f"{missing}:1:1: cannot read file: No such file or directory"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("v2: 10}", "v2: -1}"))
    with pytest.raises(ConfigError) as info:
        load(bad)
    assert [str(p) for p in info.value.problems] == [
        f"{bad}:6:27: models.iris.traffic.v2: weight must be a non-negative integer, got -1"
    ]
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    assert load(good) == parse(BASE)
