"""`consumers` and `access` in the routing YAML: parsing, every validation error with its
position (never quoting a key), the translation's split between listener and routes, and
the watcher following the keys and JWKS files."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from envoy.extensions.common.matching.v3.extension_matcher_pb2 import ExtensionWithMatcher
from envoy.extensions.filters.http.jwt_authn.v3.config_pb2 import JwtAuthentication

from control_plane import access_log, translate_auth, translate_limits
from control_plane.config import ConfigError, RoutingConfig, load
from control_plane.schema import routing_schema
from control_plane.snapshot import EXTENSION, LISTENER, PUSH_ORDER, build_snapshot
from control_plane.translate import translate
from control_plane.watcher import ConfigWatcher

ALICE = "alice-key-000000000001"
BOB = "bob-key-00000000000002"
NEW = "alice-key-000000000003"
JWKS = json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}]})
ROUTING = """\
consumers:
  keys_file: keys.yaml
  priority: {bob: low}
models:
  iris:
    versions: {v1: {endpoints: [127.0.0.1:9001]}}
    access: {consumers: [alice]}
  open:
    versions: {v1: {endpoints: [127.0.0.1:9002]}}
    access: {public: true}
  any:
    versions: {v1: {endpoints: [127.0.0.1:9003]}}
"""


def write(folder: Path, routing: str = ROUTING, keys: str | None = None) -> Path:
    (folder / "keys.yaml").write_text(f"alice: {ALICE}\nbob: {BOB}\n" if keys is None else keys)
    (folder / "jwks.json").write_text(JWKS)
    path = folder / "routing.yaml"
    path.write_text(routing)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    text = str(caught.value)
    for key in (ALICE, BOB, "short.key"):
        assert key not in text
    return text.splitlines()


def test_consumers_and_access_parse(tmp_path: Path):
    config = load(write(tmp_path))
    consumers = config.consumers
    assert consumers is not None
    assert consumers.keys == (("alice", ALICE), ("bob", BOB))
    assert consumers.keys_file == tmp_path / "keys.yaml" and consumers.jwt is None
    assert consumers.priority == {"bob": "low"}
    assert ALICE not in repr(config)
    models = {m.name: m for m in config.models}
    assert models["iris"].access.consumers == ("alice",)
    assert models["open"].access.public and models["any"].access is None


def test_jwt_and_rotating_keys(tmp_path: Path):
    routing = ROUTING.replace(
        "  keys_file: keys.yaml\n",
        "  keys_file: keys.yaml\n  jwt: {issuer: https://idp, jwks_file: jwks.json}\n",
    ).replace("[alice]", "[alice, carol]")
    config = load(write(tmp_path, routing, f"alice: [{ALICE}, {BOB}]\n"))
    assert config.consumers.keys == (("alice", ALICE), ("alice", BOB))
    jwt = config.consumers.jwt
    assert (jwt.issuer, jwt.audiences, jwt.consumer_claim) == ("https://idp", (), "sub")
    assert json.loads(jwt.jwks) == json.loads(JWKS)
    # A JWT's claim names consumers no file lists: access may name them (carol).
    assert config.consumers.known is None


@pytest.mark.parametrize(
    ("routing", "keys", "expected"),
    [
        (
            ROUTING.replace("[alice]", "[alice, mallory]"),
            None,
            "routing.yaml:7:33: models.iris.access.consumers: unknown consumer 'mallory' "
            "(known: alice, bob)",
        ),
        (ROUTING, "alice: short.key\n", "keys.yaml:1:8: alice: a key must be 16-256"),
        (ROUTING, f"alice: {ALICE}\nbob: {ALICE}\n", "keys.yaml:2:6: bob: the same key as 'alice'"),
        (ROUTING, f"- {ALICE}\n", "keys.yaml:1:1: expected 'consumer: key' lines"),
        (ROUTING, f"Alice: {ALICE}\n", "keys.yaml:1:1: a consumer name must be lowercase"),
        (ROUTING, f"alice {ALICE}\n", "keys.yaml:1:1: expected 'consumer: key' lines"),
        (
            ROUTING.replace("keys.yaml", "nokeys.yaml"),
            None,
            "routing.yaml:2:14: consumers.keys_file: cannot read",
        ),
        (
            ROUTING.replace("keys_file: keys.yaml", "jwt: {issuer: x, jwks_file: none.json}"),
            None,
            "routing.yaml:2:31: consumers.jwt.jwks_file: cannot read",
        ),
        (
            ROUTING.replace("{bob: low}", "{bob: urgent}"),
            None,
            "routing.yaml:3:19: consumers.priority.bob: must be one of low, normal, high",
        ),
        (
            ROUTING.replace("{bob: low}", "{carl: low}"),
            None,
            "routing.yaml:3:14: consumers.priority.carl: unknown consumer 'carl'",
        ),
        (
            ROUTING.replace("{public: true}", "{public: false}"),
            None,
            "routing.yaml:10:22: models.open.access.public: must be true",
        ),
        (
            ROUTING.replace("{public: true}", "{public: true, consumers: [alice]}"),
            None,
            "routing.yaml:10:13: models.open.access: give either",
        ),
        (
            "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:9001]}}\n"
            "    access: {public: true}\n",
            None,
            "routing.yaml:4:13: models.iris.access: needs a top-level 'consumers' block",
        ),
        (
            ROUTING.replace("keys_file: keys.yaml", "priority2: {}"),
            None,
            "routing.yaml:2:3: consumers.priority2: unknown key",
        ),
    ],
)
def test_errors_name_file_line_and_column(tmp_path: Path, routing: str, keys, expected: str):
    found = problems(write(tmp_path, routing, keys))
    assert any(expected in p for p in found), found


def test_jwks_must_be_a_key_set(tmp_path: Path):
    routing = ROUTING.replace(
        "keys_file: keys.yaml", "keys_file: keys.yaml\n  jwt: {issuer: x, jwks_file: jwks.json}"
    )
    path = write(tmp_path, routing)
    (tmp_path / "jwks.json").write_text('{"keys": [}')
    assert any("jwks.json:1:11: invalid JSON" in p for p in problems(path))
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    assert any("jwks.json:1:1: a JWKS needs" in p for p in problems(path))


def test_schema_accepts_consumers_and_access(tmp_path: Path):
    jsonschema.validate(yaml.safe_load(ROUTING), routing_schema())
    with pytest.raises(jsonschema.ValidationError):
        bad = yaml.safe_load(ROUTING.replace("{bob: low}", "{bob: urgent}"))
        jsonschema.validate(bad, routing_schema())


def test_keys_travel_in_routes_not_in_the_listener(tmp_path: Path):
    """A keys edit changes RDS only: Envoy applies it to the next request on every open
    connection, where a listener change would drain them."""
    resources = translate(load(write(tmp_path)))
    listener = resources.listeners["gateway"].SerializeToString()
    routes = resources.routes["gateway"].SerializeToString()
    assert ALICE.encode() not in listener and ALICE.encode() in routes


EVERYTHING = """\
quota_service: {on_failure: closed}
consumers:
  keys_file: keys.yaml
  jwt: {issuer: https://idp.test, jwks_file: jwks.json}
  priority: {bob: low}
models:
  iris:
    versions: {v1: {endpoints: ["127.0.0.1:9001"]}}
    access: {consumers: [alice]}
    limits: {rate: {per_consumer: 5/s}, quota: {per_consumer: 10/h}, max_body: 1KiB}
  open:
    versions: {v1: {endpoints: ["127.0.0.1:9002"]}}
    access: {public: true}
"""
PLAIN = "models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:9001]}}\n"


def test_the_listener_is_the_same_for_every_routing_file(tmp_path: Path):
    """No edit of consumers, keys, the JWKS or limits changes the listener (which would drain
    every open connection): the API-management filters are always in it, each disabled
    until a virtual host or route turns it on, except the rate filter (a no-op without a
    rate); the configs that change with the file come by ECDS."""
    plain = translate(load(write(tmp_path, PLAIN)))
    everything = translate(load(write(tmp_path, EVERYTHING)))
    listener = plain.listeners["gateway"].SerializeToString(deterministic=True)
    assert everything.listeners["gateway"].SerializeToString(deterministic=True) == listener
    filters = hcm(plain).http_filters
    assert [f.name for f in filters] == [
        translate_auth.STRIP,
        translate_auth.KEYS,
        translate_auth.JWT,
        translate_auth.ACCESS,
        translate_limits.REROUTE_FILTER,
        translate_limits.BODY_FILTER,
        translate_limits.RATE_FILTER,
        translate_limits.QUOTA_FILTER,
        "envoy.filters.http.router",
    ]
    enabled = {translate_limits.RATE_FILTER, "envoy.filters.http.router"}
    assert {f.name for f in filters if not f.disabled} == enabled
    # Without consumers and limits no route or virtual host turns a filter on.
    assert not any(r.typed_per_filter_config for r in all_routes(plain))
    assert not any(rc.virtual_hosts[0].typed_per_filter_config for rc in plain.routes.values())


def test_with_consumers_every_model_route_runs_the_key_check(tmp_path: Path):
    """Fail closed: the key and JWT checks, off in the listener, are on for every route of
    the virtual host, and only public models and the gateway's own routes turn them off."""
    resources = translate(load(write(tmp_path, EVERYTHING)))
    hosts = [rc.virtual_hosts[0] for n, rc in resources.routes.items() if not n.startswith("grpc/")]
    for host in hosts:  # every model's route configuration, and the gateway's
        for name in (translate_auth.STRIP, translate_auth.KEYS, translate_auth.JWT):
            assert name in host.typed_per_filter_config, name
    opened = [
        r.name
        for host in hosts
        for r in host.routes
        if translate_auth.KEYS in r.typed_per_filter_config
        or translate_auth.JWT in r.typed_per_filter_config
    ]
    assert opened and all(n.startswith(("open/", "gateway/")) for n in opened), opened


def test_jwks_and_rates_travel_by_ecds_not_in_the_listener(tmp_path: Path):
    """A JWKS, rate or quota failure mode edit changes only the ECDS resources; the listener
    names those filters, with constant defaults (the JWT one refuses every token)."""
    path = write(tmp_path, EVERYTHING)
    before = translate(load(path))
    (tmp_path / "jwks.json").write_text(JWKS.replace('"k1"', '"k2"'))
    path.write_text(EVERYTHING.replace("5/s", "6/s").replace("closed", "open"))
    after = translate(load(path))
    discovered = {translate_auth.JWT, translate_limits.RATE_FILTER, translate_limits.QUOTA_FILTER}
    assert set(before.extension_configs) == discovered
    for name, config in before.extension_configs.items():
        assert config != after.extension_configs[name], name
    assert before.listeners["gateway"] == after.listeners["gateway"]
    filters = [f for f in hcm(before).http_filters if f.name in discovered]
    assert len(filters) == 3
    for f in filters:  # a listener waits for the config; the default is a constant
        assert not f.HasField("typed_config")
        assert not f.config_discovery.apply_default_config_without_warming
        assert f.config_discovery.default_config.type_url in f.config_discovery.type_urls
    fallback = JwtAuthentication()
    wrapped = ExtensionWithMatcher()
    (jwt,) = [f for f in filters if f.name == translate_auth.JWT]
    jwt.config_discovery.default_config.Unpack(wrapped)
    wrapped.extension_config.typed_config.Unpack(fallback)
    (provider,) = fallback.providers.values()  # a key whose private half is gone
    assert json.loads(provider.local_jwks.inline_string)["keys"][0]["kty"] == "EC"
    versions = [build_snapshot(r, "e").types for r in (before, after)]
    assert versions[0][LISTENER].version == versions[1][LISTENER].version
    assert versions[0][EXTENSION].version != versions[1][EXTENSION].version
    assert PUSH_ORDER.index(LISTENER) < PUSH_ORDER.index(EXTENSION)  # asked for after LDS


def test_without_consumers_the_gateway_is_open(tmp_path: Path):
    config = load(write(tmp_path, PLAIN))
    assert config.consumers is None
    resources = translate(config)
    # The JWT filter (off) has its refuse-all default; the rate filter limits nothing.
    configs = resources.extension_configs
    assert configs[translate_auth.JWT].typed_config == translate_auth.jwt_fallback()
    assert configs[translate_limits.RATE_FILTER].typed_config == translate_limits.rate_fallback()
    assert not any(r.typed_per_filter_config for r in all_routes(resources))


def test_the_consumer_header_is_the_one_telemetry_reads():
    assert translate_auth.CONSUMER_HEADER == access_log.CONSUMER_HEADER


def hcm(resources):
    from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
        HttpConnectionManager,
    )

    out = HttpConnectionManager()
    resources.listeners["gateway"].filter_chains[0].filters[0].typed_config.Unpack(out)
    return out


def all_routes(resources):
    return [r for rc in resources.routes.values() for vh in rc.virtual_hosts for r in vh.routes]


async def test_the_watcher_follows_the_keys_file(tmp_path: Path):
    """An edit of the keys file alone reloads; a bad one is an error naming the keys file
    (the last good config stays); a keys file in another folder is watched too."""
    path = write(tmp_path)
    seen: list[RoutingConfig] = []
    errors: list[ConfigError] = []
    watcher = ConfigWatcher(path, seen.append, errors.append, mode="notify", settle=0)
    watcher.check()
    task = asyncio.create_task(watcher.run())

    async def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "not seen"
            await asyncio.sleep(0.01)

    try:
        save(tmp_path / "keys.yaml", f"bob: {BOB}\nalice: {NEW}\n")
        await until(lambda: seen[-1].consumers.keys == (("bob", BOB), ("alice", NEW)))
        save(tmp_path / "keys.yaml", f"bob: {BOB}\nalice: short.key\n")
        await until(lambda: errors)
        assert "keys.yaml:2:8" in str(errors[-1])
        assert seen[-1].consumers.keys == (("bob", BOB), ("alice", NEW))
        elsewhere = tmp_path / "secrets"
        elsewhere.mkdir()
        save(elsewhere / "k.yaml", f"alice: {ALICE}\nbob: {BOB}\n")
        save(path, ROUTING.replace("keys.yaml", "secrets/k.yaml"))
        await until(lambda: seen[-1].consumers.keys_file == elsewhere / "k.yaml")
        save(elsewhere / "k.yaml", f"alice: {NEW}\nbob: {BOB}\n")
        await until(lambda: seen[-1].consumers.keys == (("alice", NEW), ("bob", BOB)))
    finally:
        task.cancel()


def save(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
