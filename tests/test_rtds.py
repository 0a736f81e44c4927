"""Automatic sampling over RTDS, without sockets or sleeps: the runtime layer served on
both stream variants, the sampling controller with an injected clock, and the store's
scaling while the fraction changes. (Real Envoy: tests/test_telemetry_sampling.py.)"""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse, DiscoveryResponse
from envoy.service.runtime.v3.rtds_pb2 import Runtime

from control_plane.access_log import RUNTIME_LAYER, sample_key, sample_runtime
from control_plane.sampling import LADDER, SamplingController
from control_plane.snapshot import LISTENER, RUNTIME, with_runtime
from control_plane.telemetry import RequestRecord, TelemetryStore
from tests.test_streams import MODES, TWO_VERSIONS, Peer, snap


def runtime_snap(active: float):
    return with_runtime(snap(TWO_VERSIONS), {RUNTIME_LAYER: sample_runtime(active, LADDER)})


def switched_on(peer: Peer) -> list[float]:
    """The fractions whose logger the one response due now (RTDS) switches on."""
    (blob,) = peer.stream.responses().responses
    if peer.delta:
        resp = DeltaDiscoveryResponse.FromString(blob)
        resources = [r.resource for r in resp.resources]
    else:
        resp = DiscoveryResponse.FromString(blob)
        resources = list(resp.resources)
    assert resp.type_url == RUNTIME
    peer.nonces[RUNTIME] = resp.nonce
    (layer,) = (Runtime.FromString(a.value) for a in resources)
    assert layer.name == RUNTIME_LAYER
    return [f for f in LADDER if layer.layer[sample_key(f)] == 100]


@MODES
def test_the_runtime_layer_is_served_and_a_fraction_change_pushes_rtds_alone(mode):
    peer = Peer(mode, runtime_snap(1.0))
    peer.converge()
    peer.request(RUNTIME, [RUNTIME_LAYER])
    assert switched_on(peer) == [1.0]
    peer.ack(RUNTIME)
    assert peer.callbacks.events[-1][:2] == ("ack", "rtds")

    # Two changes before the ACK: one in flight, the newest follows the ACK.
    base = peer.stream.target
    peer.stream.target = with_runtime(base, {RUNTIME_LAYER: sample_runtime(0.5, LADDER)})
    assert switched_on(peer) == [0.5]  # RTDS only: no listener (no drain), no clusters
    peer.stream.target = with_runtime(base, {RUNTIME_LAYER: sample_runtime(0.125, LADDER)})
    assert peer.pump() == []
    peer.ack(RUNTIME)
    assert switched_on(peer) == [0.125]
    peer.ack(RUNTIME)
    assert peer.pump() == []


def test_with_runtime_shares_every_other_type():
    base = snap(TWO_VERSIONS)
    changed = with_runtime(base, {RUNTIME_LAYER: sample_runtime(0.5, LADDER)})
    assert changed.types[LISTENER] is base.types[LISTENER]
    assert changed.types[RUNTIME].version != base.types[RUNTIME].version
    assert changed.version != base.version
    again = with_runtime(base, {RUNTIME_LAYER: sample_runtime(0.5, LADDER)})
    assert again.types[RUNTIME].version == changed.types[RUNTIME].version  # content hash


def test_the_layer_switches_exactly_one_logger_on():
    layer = sample_runtime(0.25, LADDER).layer
    assert {k: v for k, v in layer.items() if v} == {sample_key(0.25): 100}
    assert len(layer) == len(LADDER)


# --- the controller ----------------------------------------------------------------------


def test_no_sampling_below_the_max_rate():
    c = SamplingController(max_rate=1000)
    assert c.update(0, now=0) == 1.0
    assert c.update(1000, now=1) == 1.0


def test_above_the_max_rate_the_fraction_drops_at_once_to_the_largest_step_that_fits():
    c = SamplingController(max_rate=1000)
    assert c.update(1001, now=0) == 0.5
    assert c.update(7000, now=0.5) == 0.125  # 875 logged/s
    assert c.update(10**9, now=1) == LADDER[-1]  # the bottom of the ladder holds


def test_it_rises_one_step_only_with_room_to_spare_and_after_the_hold():
    c = SamplingController(max_rate=1000, rise_below=0.8, hold=10)
    assert c.update(3000, now=0) == 0.25
    assert c.update(1900, now=5) == 0.25  # room (950 at 1/2) but within the hold
    assert c.update(1700, now=20) == 0.25  # past the hold, but 850 > 800 at 1/2
    assert c.update(1600, now=21) == 0.5  # 800 at 1/2: one step up
    assert c.update(100, now=22) == 0.5  # one step per hold
    assert c.update(100, now=32) == 1.0


def test_it_does_not_flap_around_the_max_rate():
    c = SamplingController(max_rate=1000, hold=10)
    fractions = [c.update(rate, now=t) for t, rate in enumerate([990, 1010] * 30)]
    assert fractions == [1.0] + [0.5] * 59  # one change, then it stays


def test_the_ladder_must_go_down():
    with pytest.raises(ValueError):
        SamplingController(max_rate=1, ladder=(0.5, 1.0))


# --- the store while the fraction changes --------------------------------------------------


def test_each_entry_counts_by_the_fraction_it_was_sampled_at():
    now = [100.0]
    store = TelemetryStore(clock=lambda: now[0])
    record = RequestRecord("iris", "v1", 200, "", 0.01, "id")
    store.add_all([(record, 1.0)] * 30)  # before the change: every request
    now[0] += 1
    store.add_all([(record, 1 / 0.125)] * 5)  # after it: 1 in 8
    assert store.interval("iris", "v1", 0).requests == 30 + 40
