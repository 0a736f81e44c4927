"""The rollout controller driven directly: an injected clock, measurements the test sets."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import partial

import pytest

from control_plane.config import load, parse
from control_plane.rollout import (
    RolloutController,
    RolloutError,
    ShadowStats,
)
from control_plane.state_store import FileStateStore
from control_plane.telemetry import IntervalStats
from control_plane.yaml_edit import write_traffic
from tests.test_config import BASE as TWO_VERSIONS

# iris v1 and v2 (test_config's), all traffic on v1
ALL_ON_V1 = TWO_VERSIONS.replace("traffic: {v1: 90, v2: 10}", "traffic: {v1: 100}")
FILE = ALL_ON_V1 + (
    "    rollout: {canary: v2, steps: [10, 25, 50, 100], interval: 10s, min_requests: 100%s}\n"
)


@dataclass
class Records:
    """Per-request records (time, version, error, duration) that the test adds; implements
    the Measurements protocol the way the telemetry store does."""

    rows: list[tuple[float, str, bool, float]] = field(default_factory=list)

    def add(self, t0: float, t1: float, version: str, n: int, errors=0.0, latency=0.05) -> None:
        rng = random.Random(f"{t0}{version}{n}")
        for i in range(n):
            t = t0 + (t1 - t0) * (i + 0.5) / n
            self.rows.append((t, version, rng.random() < errors, latency * rng.uniform(0.8, 1.2)))

    def interval(self, model, version, since, until=None) -> IntervalStats:
        rows = [
            r
            for r in self.rows
            if r[1] == version and since <= r[0] and (until is None or r[0] < until)
        ]
        return IntervalStats(len(rows), sum(r[2] for r in rows), tuple(r[3] for r in rows))


class Pairs:
    def __init__(self, pairs: int, agreeing: int):
        self.stats = ShadowStats(
            pairs, agreeing, ({"request_id": "r1", "primary": [1], "shadow": [2]},)
        )

    def agreement(self, model, primary, shadow, since, until=None) -> ShadowStats:
        return self.stats


def controller(tmp_path, records, extra="", **kw):
    c = RolloutController(records, FileStateStore(tmp_path / "state"), **kw)
    c.observe_config(parse(FILE % extra), now=0.0)
    return c


def run_interval(c, records, start, *, canary=(200, 0.0, 0.05), baseline=(1800, 0.0, 0.05)):
    """Traffic for one interval [start, start+10), a tick every second."""
    records.add(start, start + 10, "v2", canary[0], canary[1], canary[2])
    records.add(start, start + 10, "v1", baseline[0], baseline[1], baseline[2])
    for second in range(1, 11):
        c.tick(start + second)
    return c.status()["iris"]


def test_healthy_canary_walks_every_step_then_promotes(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    assert c.overrides()["iris"].traffic == {"v1": 90, "v2": 10}
    seen = []
    for i in range(3):
        st = run_interval(c, records, 10.0 * i)
        seen.append((st["phase"], st["step"], st["canary_weight"]))
    assert seen == [("progressing", 2, 25), ("progressing", 3, 50), ("succeeded", 3, 100)]
    assert c.overrides()["iris"].traffic == {"v1": 0, "v2": 100}
    kinds = [h["kind"] for h in c.status()["iris"]["history"]]
    assert kinds == ["start", "advance", "advance", "promote"]
    last = c.status()["iris"]["history"][-1]
    assert last["canary"]["requests"] == 200 and last["baseline"]["requests"] == 1800
    json.dumps(c.status(), allow_nan=False)  # the admin API's body
    assert {ch["alpha"] for ch in last["checks"]} == {0.005}  # half the budget: early looks
    assert {ch["name"] for ch in last["checks"]} == {
        "error_rate",
        "errors_vs_baseline",
        "latency_vs_baseline",
    }


def test_failing_canary_is_rolled_back_in_one_interval_with_its_numbers(tmp_path):
    records = Records()
    c = controller(tmp_path, records, early=False, wall_clock=lambda: 1_800_000_000.0)
    st = run_interval(c, records, 0.0, canary=(200, 0.05, 0.05))
    assert (st["phase"], st["canary_weight"]) == ("rolled_back", 0)
    assert c.overrides()["iris"].traffic == {"v1": 100, "v2": 0}
    assert "error_rate failed" in st["reason"] and "errors_vs_baseline failed" in st["reason"]
    decision = st["history"][-1]
    assert decision["kind"] == "rollback" and decision["clock"] == 10.0
    assert decision["time"] == 1_800_000_000.0  # Unix time, for people
    assert decision["canary"]["errors"] > 0
    failed = [ch for ch in decision["checks"] if not ch["passed"]]
    assert failed and all(ch["p_value"] < ch["alpha"] == 0.01 for ch in failed)


def test_early_looks_roll_a_failing_canary_back_before_the_interval_ends(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    st = run_interval(c, records, 0.0, canary=(2000, 0.05, 0.05), baseline=(18000, 0.0, 0.05))
    decision = st["history"][-1]
    assert st["phase"] == "rolled_back" and decision["clock"] < 10.0
    assert st["reason"].startswith("early look: ")
    failed = [ch for ch in decision["checks"] if not ch["passed"]]
    assert failed and all(ch["p_value"] < ch["alpha"] < 0.005 for ch in failed)


def test_three_times_slower_canary_is_rolled_back(tmp_path):
    records = Records()
    c = controller(tmp_path, records, ", max_p99: 100ms")
    st = run_interval(c, records, 0.0, canary=(200, 0.0, 0.15))
    assert st["phase"] == "rolled_back"
    assert "latency_vs_baseline failed" in st["reason"] and "x3." in st["reason"]
    assert "p99 failed" in st["reason"]


def test_silence_holds_never_advances_and_fails_after_the_hold_timeout(tmp_path):
    records = Records()
    c = controller(tmp_path, records, ", hold_timeout: 30s")
    st = run_interval(c, records, 0.0, canary=(40, 0.0, 0.05))
    assert (st["phase"], st["step"], st["canary_weight"]) == ("progressing", 1, 10)
    assert "hold: 40 of 100 canary requests" in st["reason"] and "never advances" in st["reason"]
    st = run_interval(c, records, 10.0, canary=(0, 0.0, 0.05), baseline=(0, 0, 0))
    assert st["history"][-1]["kind"] == "hold" and st["canary_weight"] == 10
    st = run_interval(c, records, 20.0, canary=(0, 0.0, 0.05), baseline=(0, 0, 0))
    assert st["phase"] == "rolled_back" and "hold timeout is 30s" in st["reason"]


def test_requests_accumulate_over_holds_until_min_requests(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    run_interval(c, records, 0.0, canary=(60, 0.0, 0.05))
    st = run_interval(c, records, 10.0, canary=(60, 0.0, 0.05))
    assert (st["step"], st["history"][-1]["canary"]["requests"]) == (2, 120)


def test_failure_limit_allows_that_many_failed_analyses(tmp_path):
    records = Records()
    c = controller(tmp_path, records, ", failure_limit: 2", early=False)
    st = run_interval(c, records, 0.0, canary=(200, 0.05, 0.05))
    assert (st["phase"], st["step"], st["history"][-1]["kind"]) == ("progressing", 1, "fail")
    assert "failure 1 of 2" in st["reason"]
    st = run_interval(c, records, 10.0, canary=(200, 0.05, 0.05))
    assert st["phase"] == "rolled_back" and "failure 2 of 2" in st["reason"]


def test_one_decision_per_interval(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    records.add(0, 5, "v2", 500)
    records.add(0, 5, "v1", 500)
    c.tick(5.0)
    c.tick(9.9)
    assert c.status()["iris"]["step"] == 1 and len(c.status()["iris"]["history"]) == 1
    c.tick(10.0)
    assert c.status()["iris"]["step"] == 2
    c.tick(15.0)
    c.tick(19.9)
    assert len(c.status()["iris"]["history"]) == 2
    c.tick(20.0)
    assert c.status()["iris"]["history"][-1]["kind"] == "hold"


def test_shadow_phase_mirrors_then_steps_or_rolls_back(tmp_path):
    shadow = ", shadow: {percent: 50, min_pairs: 300, min_agreement: 0.99}"
    records = Records()
    good = controller(tmp_path / "a", records, shadow, shadows=Pairs(400, 399))
    assert good.status()["iris"]["phase"] == "shadowing"
    override = good.overrides()["iris"]
    assert override.traffic == {"v1": 100, "v2": 0} and override.mirror == ("v2", 50)
    model = good.apply(parse(FILE % shadow)).models[0]
    assert dict(model.traffic) == {"v1": 100, "v2": 0} and model.shadow.percent == 50
    good.tick(10.0)
    st = good.status()["iris"]
    assert (st["phase"], st["step"], st["canary_weight"]) == ("progressing", 1, 10)
    assert good.overrides()["iris"].mirror is None

    bad = controller(tmp_path / "b", records, shadow, shadows=Pairs(400, 280))
    bad.tick(10.0)
    st = bad.status()["iris"]
    assert (st["phase"], st["canary_weight"]) == ("rolled_back", 0)
    assert "70.00% of 400" in st["reason"] and st["history"][-1]["shadow"]["examples"]

    few = controller(tmp_path / "c", records, shadow, shadows=Pairs(100, 100))
    few.tick(10.0)
    assert few.status()["iris"]["phase"] == "shadowing"
    assert "100 of 300 answer pairs" in few.status()["iris"]["reason"]


def test_a_new_controller_on_the_same_store_resumes_at_the_same_step(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    run_interval(c, records, 0.0)
    before = c.status()["iris"]
    assert before["step"] == 2
    again = controller(tmp_path, records)
    assert again.status()["iris"] == before
    assert again.overrides()["iris"].traffic == {"v1": 75, "v2": 25}
    st = run_interval(again, records, 10.0)
    assert st["step"] == 3 and len(st["history"]) == len(before["history"]) + 1


def test_editing_traffic_in_the_file_pauses_and_the_file_applies(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    edited = (FILE % "").replace("traffic: {v1: 100}", "traffic: {v1: 50, v2: 50}")
    c.observe_config(parse(edited), now=3.0)
    st = c.status()["iris"]
    assert st["phase"] == "paused" and "traffic in the file changed" in st["reason"]
    assert "iris" not in c.overrides()
    run_interval(c, records, 0.0)
    assert c.status()["iris"]["step"] == 1  # no decisions while paused
    c.resume("iris", now=20.0)
    assert c.status()["iris"]["phase"] == "progressing"
    assert c.overrides()["iris"].traffic == {"v1": 90, "v2": 10}
    c.observe_config(parse(edited.replace("v1: 50, v2: 50", "v1: 60, v2: 40")), now=21.0)
    assert "iris" not in c.overrides()
    c.abort("iris", now=22.0)  # an abort overrides the file at once
    assert c.overrides()["iris"].traffic == {"v1": 100, "v2": 0}


def test_operator_actions(tmp_path):
    records = Records()
    c = controller(tmp_path, records)
    c.pause("iris", now=1.0)
    assert c.status()["iris"]["phase"] == "paused"
    assert c.overrides()["iris"].traffic == {"v1": 90, "v2": 10}  # weights stay
    with pytest.raises(RolloutError, match="not running"):
        c.pause("iris", now=2.0)
    c.resume("iris", now=3.0)
    c.abort("iris", now=4.0)
    st = c.status()["iris"]
    assert (st["phase"], st["canary_weight"], st["history"][-1]["kind"]) == (
        "rolled_back",
        0,
        "abort",
    )
    assert c.overrides()["iris"].traffic == {"v1": 100, "v2": 0}
    with pytest.raises(RolloutError, match="already rolled_back"):
        c.promote("iris", now=5.0)
    with pytest.raises(RolloutError, match="no rollout for model 'nope'"):
        c.abort("nope", now=5.0)
    other = controller(tmp_path / "p", records)
    other.promote("iris", now=1.0)
    assert other.overrides()["iris"].traffic == {"v1": 0, "v2": 100}


def test_ended_rollout_writes_its_traffic_once_and_retries_on_error(tmp_path):
    records = Records()
    writes, fail = [], [True]

    def write(model, traffic):
        if fail[0]:
            raise OSError("the file changed since it was read")
        writes.append((model, traffic))

    c = controller(tmp_path, records, write_traffic=write)
    c.abort("iris", now=1.0)
    assert "not updated yet: the file changed" in c.status()["iris"]["reason"]
    fail[0] = False
    c.tick(2.0)
    c.tick(3.0)
    assert writes == [("iris", {"v1": 100, "v2": 0})]
    # the written file no longer has the block: the record stays, the file rules
    c.observe_config(parse(ALL_ON_V1), now=4.0)
    assert c.status()["iris"]["phase"] == "rolled_back" and "iris" not in c.overrides()
    c.observe_config(parse(FILE % ""), now=5.0)  # the block again: a new rollout
    assert [h["kind"] for h in c.status()["iris"]["history"]] == ["start"]


def test_promotion_writes_the_canary_at_100_into_the_yaml_with_its_comments(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text("# operator's note\n" + (FILE % "").replace("{v1: 100}", "{v1: 100}  # start"))
    records = Records()
    c = RolloutController(
        records, FileStateStore(tmp_path / "state"), write_traffic=partial(write_traffic, path)
    )
    c.observe_config(load(path), now=0.0)
    c.promote("iris", now=1.0)
    text = path.read_text()
    assert text.startswith("# operator's note\n") and "traffic: {v1: 0, v2: 100} # start" in text
    assert "rollout" not in text
    c.observe_config(load(path), now=2.0)  # the watcher's reload of our own write
    assert c.status()["iris"]["phase"] == "succeeded" and "iris" not in c.overrides()
