"""Snapshots reuse the encoding of every message translation shares between builds."""

from __future__ import annotations

from bench.xds_scale.configs import routing_yaml
from control_plane import snapshot
from control_plane.config import parse
from control_plane.snapshot import CLUSTER, ROUTE, build_snapshot
from control_plane.translate import model_routes_name, translate


def test_a_one_model_edit_encodes_only_that_models_resources_and_versions_stay_exact():
    before = build_snapshot(translate(parse(routing_yaml(5))), "e")
    after = build_snapshot(translate(parse(routing_yaml(5, edit=1))), "e")
    edited, other = model_routes_name("model-0000"), model_routes_name("model-0001")
    routes_before, routes_after = before.types[ROUTE].resources, after.types[ROUTE].resources
    assert routes_after[other] is routes_before[other]  # the same bytes object: not re-encoded
    assert routes_after[edited] != routes_before[edited]
    for name in (n for n in routes_after if n.startswith("models/")):
        reused = routes_after[name] is routes_before[name]
        assert reused == (name != edited), name
    # A weight edit leaves the clusters as they were: the same type snapshot object, so
    # what streams derived from it stays valid; the routes' is new.
    assert after.types[CLUSTER] is before.types[CLUSTER]
    assert after.types[ROUTE] is not before.types[ROUTE]
    # Encoded from scratch, the same bytes and versions.
    snapshot._last_build.clear()
    snapshot._last_types.clear()
    fresh = build_snapshot(translate(parse(routing_yaml(5, edit=1))), "e")
    for type_url, types in after.types.items():
        assert types.resources == fresh.types[type_url].resources
        assert types.versions == fresh.types[type_url].versions
        assert types.version == fresh.types[type_url].version


def test_translation_keeps_what_the_last_build_used_and_drops_the_rest():
    """However many models a config has (a fixed-size LRU cache thrashed above its size)."""
    from control_plane.translate import _PerBuild

    calls: list[int] = []
    square = _PerBuild(lambda x: calls.append(x) or x * x)
    assert [square(x) for x in range(10_000)] == [x * x for x in range(10_000)]
    square.next_build()  # build 2 uses every other value again: none is computed twice
    assert [square(x) for x in range(0, 10_000, 2)] == [x * x for x in range(0, 10_000, 2)]
    assert len(calls) == 10_000
    square.next_build()  # build 3: the odd ones were not used by build 2, so they are gone
    square(1)
    square(2)
    assert calls[-1] == 1 and len(calls) == 10_001
