"""`Stream.responses()` looks only at the types that an event may have changed (a
snapshot's changed types, and `streams.AFFECTS` for requests and sends). Random runs of
Envoy-like requests, edits and clock steps check that it answers exactly what looking at
every type answers, in both modes."""

from __future__ import annotations

import random

import pytest

from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    PUSH_ORDER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    SHORT_NAMES,
)
from control_plane.streams import DeltaStream, SotwStream
from tests.fake_clock import FakeClock
from tests.test_streams import (
    MODES,
    NO_CHECKS,
    TWO_MODELS,
    TWO_VERSIONS,
    Peer,
    Sent,
    route_configs,
    snap,
    weights,
    with_v3,
    without_v2,
)
from tests.test_upstream_tls_streams import SECRETS, tls_snap

CONFIGS = [
    TWO_VERSIONS,
    with_v3(TWO_VERSIONS),
    without_v2(TWO_VERSIONS),
    weights(TWO_VERSIONS, 50, 50),
    NO_CHECKS,
    with_v3(NO_CHECKS),
    TWO_MODELS,
    weights(TWO_MODELS, 50, 50),
]
TYPE_URLS = {short: url for url, short in SHORT_NAMES.items()}


class EveryType:
    """The reference: every type looked at on every call."""

    def responses(self):
        self._due.update(PUSH_ORDER)
        return super().responses()


class EverySotw(EveryType, SotwStream):
    pass


class EveryDelta(EveryType, DeltaStream):
    pass


class Twins:
    """Two peers, the stream under test and the reference, given the same inputs; Envoy's
    side acts on what the first one sends."""

    def __init__(self, mode: str, rng: random.Random) -> None:
        self.rng, self.clock = rng, FakeClock()
        first = snap(TWO_VERSIONS)
        reference = EveryDelta if mode == "delta" else EverySotw
        self.peers = (
            Peer(mode, first, self.clock),
            Peer(mode, first, self.clock, stream_class=reference),
        )
        self.delta = mode == "delta"
        self.unanswered: dict[str, Sent] = {}
        self.clusters: set[str] = set()
        self.scopes: set[str] = set()
        self.both(lambda p: p.request(CLUSTER))

    def both(self, action) -> None:
        for peer in self.peers:
            action(peer)

    def pump(self) -> None:
        sent, reference = (p.pump() for p in self.peers)
        assert sent == reference
        assert self.peers[0].wake_after == self.peers[1].wake_after
        for s in sent:
            self.unanswered[s.type] = s
            if s.type == "cds":  # Envoy asks for the clusters' endpoints (and secrets)
                self.clusters = s.names if not self.delta else (self.clusters | s.names) - s.removed
                self.both(lambda p: p.request(ENDPOINT, sorted(self.clusters), nonce=""))
                if SECRET in self.peers[0].stream.target.types:
                    self.both(lambda p: p.request(SECRET, SECRETS, nonce=""))
            elif s.type == "srds":  # and for the route configurations the scopes name
                self.scopes = s.names if not self.delta else (self.scopes | s.names) - s.removed
                names = sorted(route_configs(Sent("srds", self.scopes, set(), "")))
                self.both(lambda p, names=names: p.request(ROUTE, names, nonce=""))

    def step(self) -> None:
        rng = self.rng
        action = rng.choices(
            ["edit", "pump", "answer", "stale", "drop-routes", "time", "listen"],
            weights=[12, 35, 35, 4, 4, 6, 4],
        )[0]
        if action == "edit":
            text, serial = rng.choice(CONFIGS), rng.choice([0, 0, 1, 2])
            target = tls_snap(text, serial) if serial else snap(text)
            self.both(lambda p: setattr(p.stream, "target", target))
        elif action == "pump":
            self.pump()
        elif action == "answer" and self.unanswered:
            short = rng.choice(sorted(self.unanswered))
            del self.unanswered[short]
            if rng.random() < 0.1:
                self.both(lambda p: p.nack(TYPE_URLS[short], "rejected for test"))
            else:
                self.both(lambda p: p.ack(TYPE_URLS[short]))
        elif action == "stale":
            type_url = rng.choice([CLUSTER, ENDPOINT, ROUTE, SCOPED_ROUTE])
            self.both(lambda p: p.request(type_url, nonce="0"))
        elif action == "drop-routes":  # a scope's route configuration dropped for a while
            names = sorted(route_configs(Sent("srds", self.scopes, set(), "")))
            kept = [n for n in names if rng.random() < 0.7]
            self.both(lambda p: p.request(ROUTE, kept, nonce=""))
        elif action == "time":
            self.clock.advance(rng.choice([0.01, 0.5, 2.0, 6.0]))
        elif action == "listen":
            self.both(lambda p: p.request(SCOPED_ROUTE, nonce=""))


@MODES
@pytest.mark.parametrize("seed", range(30))
def test_looking_at_due_types_only_answers_what_every_type_would(mode, seed):
    twins = Twins(mode, random.Random(seed))
    for _ in range(150):
        twins.step()
    twins.pump()
    first, reference = twins.peers
    assert first.callbacks.events == reference.callbacks.events


@MODES
def test_a_weight_edit_looks_at_the_routes_alone(mode):
    peer = Peer(mode, snap(TWO_VERSIONS))
    peer.converge()
    looked: list[str] = []
    desired = peer.stream._desired
    peer.stream._desired = lambda type_url, snapshot: (
        looked.append(type_url) or desired(type_url, snapshot)
    )
    peer.retarget(weights(TWO_VERSIONS, 50, 50))
    assert peer.types() == ["rds"] and looked == [ROUTE]
    peer.ack(ROUTE)  # the clusters the old routes named may go now
    assert peer.pump() == [] and looked == [ROUTE, CLUSTER, ENDPOINT, ROUTE]
