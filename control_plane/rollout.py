"""The rollout controller: moves a canary through its steps and judges each one.

It is a pure state machine: the caller passes the time (a monotonic clock) to every call,
measurements come in through the `Measurements` (and `ShadowComparisons`) protocol, and the
controller acts only by the weights it wants (`overrides()`, applied on top of the file by
`apply()`), plus one callback that writes the final traffic into the routing YAML when a
rollout ends. Each decision is recorded with its numbers, reason in words and Unix time,
and the state is saved in a `StateStore` after every change, so that a restarted
controller resumes at the same step.

Between decisions, "early looks" may roll a badly failing canary back within the interval
at no cost in false alarms (alpha spending, see `_look_early`).

Phases: `shadowing` (the canary gets mirrored traffic only) -> `progressing` (one step per
passed analysis) -> `succeeded` (canary at 100) or `rolled_back` (canary at 0); `paused` in
between by the operator or by an edit of the model's `traffic` in the file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from control_plane.analysis import ALPHA, Analysis, Numbers, analyse, preload_stats
from control_plane.config import Model, Rollout, RolloutShadow, RoutingConfig, Shadow
from control_plane.state_store import Conflict, StateStore
from control_plane.telemetry import IntervalStats

log = logging.getLogger(__name__)

ACTIVE = ("shadowing", "progressing")
ENDED = ("succeeded", "rolled_back")
PHASES = (*ACTIVE, "paused", *ENDED)
MAX_HISTORY = 500


class Measurements(Protocol):
    def interval(
        self, model: str, version: str, since: float, until: float | None = None
    ) -> IntervalStats: ...


@dataclass(frozen=True)
class ShadowStats:
    """Paired primary and shadow answers: how many, how many agreed, a few that did not
    (each a dict with the request id and both outputs)."""

    pairs: int
    agreeing: int
    examples: tuple[dict[str, Any], ...] = ()


class ShadowComparisons(Protocol):
    def agreement(
        self, model: str, primary: str, shadow: str, since: float, until: float | None = None
    ) -> ShadowStats: ...


class RolloutError(Exception):
    """An action that does not apply in the rollout's phase."""


class NoRollout(RolloutError):
    """The model has no rollout."""


# Writes a model's final traffic into the routing YAML and drops its rollout block.
TrafficWriter = Callable[[str, dict[str, int]], None]


@dataclass(frozen=True)
class Override:
    """The weights the controller wants for one model, and during the shadow phase the
    percentage of requests mirrored to the canary."""

    traffic: dict[str, int]
    mirror: tuple[str, float] | None = None


@dataclass
class State:
    """One model's rollout, as saved in the store (see `to_dict`)."""

    model: str
    spec: Rollout
    phase: str
    step: int  # 1-based index into spec.steps; 0 before the first step
    canary_weight: int
    file_traffic: dict[str, int]  # the file's traffic the rollout started from
    window_start: float  # the analysis window since the last advance or failure
    last_decision: float
    spent: float = 0.0  # the error budget used by early looks since last_decision
    reason: str = ""
    failures: int = 0
    paused_from: str = ""  # the phase to resume to
    hands_off: bool = False  # paused by a file edit: the file's traffic applies
    detached: bool = False  # the file no longer has this rollout block
    written: bool = False  # the final traffic is in the routing YAML
    history: list[dict[str, Any]] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)  # by kind, never truncated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        spec = dict(d["spec"], steps=tuple(d["spec"]["steps"]))
        if spec["shadow"] is not None:
            spec["shadow"] = RolloutShadow(**spec["shadow"])
        return cls(**dict(d, spec=Rollout(**spec)))

    def status(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "canary": self.spec.canary,
            "baseline": self.spec.baseline,
            "step": self.step,
            "steps": list(self.spec.steps),
            "canary_weight": self.canary_weight,
            "reason": self.reason,
            "failures": self.failures,
            "decisions": dict(self.decisions),
            "history": list(self.history),
        }


def _describe(traffic: dict[str, int]) -> str:
    return ", ".join(f"{v}: {w}" for v, w in traffic.items()) or "none"


class RolloutController:
    """Drives every model's rollout; call `observe_config` on each good config and `tick`
    often (at least once per interval)."""

    def __init__(
        self,
        measurements: Measurements,
        store: StateStore,
        *,
        shadows: ShadowComparisons | None = None,
        write_traffic: TrafficWriter | None = None,
        early: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.measurements = measurements
        self.early = early
        self.wall_clock = wall_clock
        self.shadows = shadows
        self.store = store
        self.write_traffic = write_traffic
        self._states: dict[str, State] = {}
        self._revisions: dict[str, int] = {}

    # -- state and storage ---------------------------------------------------------------

    def _load(self, model: str) -> State | None:
        if model not in self._states:
            stored = self.store.get(f"rollout/{model}")
            if stored is None:
                return None
            self._states[model] = State.from_dict(stored.value)
            self._revisions[model] = stored.revision
        return self._states[model]

    def _save(self, state: State) -> None:
        key = f"rollout/{state.model}"
        try:
            self._revisions[state.model] = self.store.put(
                key, state.to_dict(), self._revisions.get(state.model, 0)
            )
        except Conflict:
            log.warning("rollout of %s changed in the store; reloading it", state.model)
            self._states.pop(state.model, None)
            self._revisions.pop(state.model, None)
            self._load(state.model)

    def _record(self, s: State, now: float, kind: str, reason: str, **numbers: Any) -> None:
        s.reason = reason
        entry = {
            "time": self.wall_clock(),  # Unix time, for people
            "clock": now,  # the caller's (monotonic) clock, as in window_start
            "kind": kind,
            "step": s.step,
            "canary_weight": s.canary_weight,
        }
        s.history.append({**entry, "reason": reason, **numbers})
        s.decisions[kind] = s.decisions.get(kind, 0) + 1
        del s.history[:-MAX_HISTORY]
        log.info(
            "rollout %s: %s at step %d (%d%%): %s", s.model, kind, s.step, s.canary_weight, reason
        )

    # -- the file ----------------------------------------------------------------------

    def observe_config(self, config: RoutingConfig, now: float) -> None:
        """Start rollouts for new `rollout` blocks; pause a rollout whose `traffic` was edited
        in the file or whose block was removed."""
        names = {m.name for m in config.models}
        stored = self.store.keys("rollout/")  # one listing, not a read per model
        for model in config.models:
            if model.rollout is not None:
                preload_stats()
                self._observe_model(model, model.rollout, now)
            elif model.name in self._states or f"rollout/{model.name}" in stored:
                if self._load(model.name):  # an ended rollout's record, or a block removed
                    self._detach(self._states[model.name], now)
        for name in set(self._states) - names:
            self._detach(self._states[name], now)

    def _observe_model(self, model: Model, spec: Rollout, now: float) -> None:
        s = self._load(model.name)
        same = s is not None and (s.spec.canary, s.spec.baseline) == (spec.canary, spec.baseline)
        if s is None or not same or s.detached:
            self._start(model, spec, now)
            return
        changed = s.spec != spec
        s.spec = spec  # new thresholds apply from the next analysis on
        traffic = dict(model.traffic)
        if traffic != s.file_traffic and s.phase not in ENDED:
            before = _describe(s.file_traffic)
            s.file_traffic = traffic
            self._pause(
                s,
                now,
                True,
                f"traffic in the file changed from {{{before}}} to "
                f"{{{_describe(traffic)}}} during the rollout: paused, the file's "
                "traffic applies until resume",
            )
        elif changed:
            self._save(s)

    def _start(self, model: Model, spec: Rollout, now: float) -> None:
        shadow = spec.shadow is not None
        s = State(
            model=model.name,
            spec=spec,
            phase="shadowing" if shadow else "progressing",
            step=0 if shadow else 1,
            canary_weight=0 if shadow else spec.steps[0],
            file_traffic=dict(model.traffic),
            window_start=now,
            last_decision=now,
        )
        first = (
            f"shadowing {spec.canary} at {spec.shadow.percent:g}%"
            if spec.shadow
            else f"step 1 ({spec.steps[0]}%)"
        )
        self._states[model.name] = s
        self._record(s, now, "start", f"rollout of {spec.canary} over {spec.baseline}: {first}")
        self._save(s)

    def _detach(self, s: State, now: float) -> None:
        if s.detached:
            return
        s.detached = True
        if s.phase in ENDED:
            self._save(s)
        else:
            self._pause(
                s,
                now,
                True,
                "the rollout block was removed from the file: stopped, the file's traffic applies",
            )

    # -- decisions -----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Take each due decision (one per interval), look early for a failing canary, and
        retry pending YAML writes."""
        for s in list(self._states.values()):
            if s.phase in ACTIVE and now >= s.last_decision + s.spec.interval:
                s.last_decision, s.spent = now, 0.0
                if s.phase == "shadowing":
                    self._judge_shadow(s, now)
                else:
                    self._judge_step(s, now)
                self._save(s)
            elif s.phase == "progressing" and self.early:
                self._look_early(s, now)
            if s.phase in ENDED and not s.written and not s.detached:
                self._write(s)

    def _look_early(self, s: State, now: float) -> None:
        """Between decisions, test for a failing canary with the share of half the error
        budget that the elapsed part of the interval allows (alpha spending): by the union
        bound, all looks of an interval together false-alarm at most ALPHA/2, and the decision
        at its end (at ALPHA/2) keeps the total at ALPHA. Early looks only roll back."""
        budget = ALPHA / 2 * (now - s.last_decision) / s.spec.interval
        if budget <= s.spent:
            return
        spec = s.spec
        canary = self.measurements.interval(s.model, spec.canary, s.window_start, now)
        if canary.requests < spec.min_requests:
            return
        baseline = self.measurements.interval(s.model, spec.baseline, s.window_start, now)
        result = analyse(canary, baseline, spec, budget - s.spent)
        s.spent = budget
        if not result.passed:
            s.last_decision, s.spent = now, 0.0
            self._failed(s, now, result, "early look: ")
            self._save(s)

    def _hold(self, s: State, now: float, waiting: str, numbers: dict[str, Any]) -> None:
        waited = now - s.window_start
        if waited >= s.spec.hold_limit:
            reason = f"held {waited:.0f}s, the hold timeout is {s.spec.hold_limit:.0f}s: {waiting}"
            self._end(s, now, "rollback", "rolled_back", reason, numbers)
        else:
            reason = (
                f"hold: {waiting}; never advances on silence; fails after "
                f"{s.spec.hold_limit - waited:.0f}s more"
            )
            self._record(s, now, "hold", reason, **numbers)

    def _judge_shadow(self, s: State, now: float) -> None:
        spec, shadow = s.spec, s.spec.shadow
        assert shadow is not None
        if self.shadows is None:
            stats = ShadowStats(0, 0)
        else:
            stats = self.shadows.agreement(s.model, spec.baseline, spec.canary, s.window_start, now)
        rate = stats.agreeing / stats.pairs if stats.pairs else None
        numbers = {
            "shadow": {
                "pairs": stats.pairs,
                "agreeing": stats.agreeing,
                "agreement": rate,
                "min_pairs": shadow.min_pairs,
                "min_agreement": shadow.min_agreement,
                "examples": list(stats.examples[:5]),
            }
        }
        if rate is None or stats.pairs < shadow.min_pairs:
            source = "" if self.shadows else " (no shadow comparison source)"
            self._hold(s, now, f"{stats.pairs} of {shadow.min_pairs} answer pairs{source}", numbers)
        elif rate < shadow.min_agreement:
            reason = (
                f"shadow agreed on {rate:.2%} of {stats.pairs} answer pairs, below the "
                f"{shadow.min_agreement:.2%} required: no user saw the canary"
            )
            self._end(s, now, "rollback", "rolled_back", reason, numbers)
        else:
            reason = f"shadow agreed on {rate:.2%} of {stats.pairs} answer pairs"
            self._advance(s, now, reason, numbers)

    def _judge_step(self, s: State, now: float) -> None:
        spec = s.spec
        since = s.window_start
        canary = self.measurements.interval(s.model, spec.canary, since, now)
        baseline = self.measurements.interval(s.model, spec.baseline, since, now)
        if canary.requests < spec.min_requests:
            waiting = f"{canary.requests:.0f} of {spec.min_requests} canary requests"
            numbers = Analysis(Numbers.of(canary), Numbers.of(baseline)).to_dict()
            self._hold(s, now, waiting, numbers)
            return
        result = analyse(canary, baseline, spec, ALPHA / 2 if self.early else ALPHA)
        if result.passed:
            passed = "all checks passed: " + "; ".join(c.reason for c in result.checks)
            self._advance(s, now, passed, result.to_dict())
        else:
            self._failed(s, now, result, "")

    def _failed(self, s: State, now: float, result: Analysis, prefix: str) -> None:
        s.failures += 1
        failed = prefix + "; ".join(f"{c.name} failed: {c.reason}" for c in result.failed)
        count = f"failure {s.failures} of {s.spec.failure_limit} allowed"
        if s.failures >= s.spec.failure_limit:
            self._end(s, now, "rollback", "rolled_back", f"{failed} ({count})", result.to_dict())
        else:
            s.window_start = now
            reason = f"{failed} ({count}); staying at step {s.step}"
            self._record(s, now, "fail", reason, **result.to_dict())

    def _advance(self, s: State, now: float, why: str, numbers: dict[str, Any]) -> None:
        steps = s.spec.steps
        if s.step >= len(steps) or steps[s.step] == 100:
            self._end(s, now, "promote", "succeeded", f"{why}; promoted", numbers)
            return
        s.phase, s.step, s.canary_weight = "progressing", s.step + 1, steps[s.step]
        s.window_start = now
        self._record(
            s, now, "advance", f"{why}; advanced to step {s.step} ({s.canary_weight}%)", **numbers
        )

    def _end(
        self, s: State, now: float, kind: str, phase: str, reason: str, numbers: dict[str, Any]
    ) -> None:
        s.phase, s.hands_off = phase, False
        s.canary_weight = 100 if phase == "succeeded" else 0
        self._record(s, now, kind, reason, **numbers)
        self._write(s)

    def _write(self, s: State) -> None:
        if self.write_traffic is None:
            return
        try:
            self.write_traffic(s.model, self._traffic(s))
        except Exception as exc:  # kept as the reason; retried on the next tick
            s.reason = f"{s.history[-1]['reason']}; the routing YAML is not updated yet: {exc}"
        else:
            s.written = True
            s.reason = s.history[-1]["reason"]
        self._save(s)

    # -- actions -------------------------------------------------------------------------

    def _get(self, model: str) -> State:
        s = self._load(model)
        if s is None:
            raise NoRollout(f"no rollout for model {model!r}")
        return s

    def _pause(self, s: State, now: float, hands_off: bool, reason: str) -> None:
        if s.phase in ACTIVE:
            s.paused_from = s.phase
        s.phase, s.hands_off = "paused", s.hands_off or hands_off
        self._record(s, now, "pause", reason)
        self._save(s)

    def pause(self, model: str, now: float) -> None:
        s = self._get(model)
        if s.phase not in ACTIVE:
            raise RolloutError(f"rollout of {model!r} is {s.phase}, not running")
        self._pause(s, now, False, "paused by the operator: weights stay")

    def resume(self, model: str, now: float) -> None:
        s = self._get(model)
        if s.phase != "paused":
            raise RolloutError(f"rollout of {model!r} is {s.phase}, not paused")
        if s.detached:
            raise RolloutError(f"the file has no rollout block for {model!r} any more")
        s.phase, s.hands_off, s.spent = s.paused_from, False, 0.0
        s.window_start = s.last_decision = now
        self._record(s, now, "resume", f"resumed by the operator at step {s.step}")
        self._save(s)

    def promote(self, model: str, now: float) -> None:
        s = self._get(model)
        if s.phase in ENDED:
            raise RolloutError(f"rollout of {model!r} already {s.phase}")
        self._end(s, now, "promote", "succeeded", "promoted by the operator", {})

    def abort(self, model: str, now: float) -> None:
        s = self._get(model)
        if s.phase in ENDED:
            raise RolloutError(f"rollout of {model!r} already {s.phase}")
        self._end(
            s,
            now,
            "abort",
            "rolled_back",
            "aborted by the operator: all traffic to the baseline",
            {},
        )

    ACTIONS = ("pause", "resume", "promote", "abort")

    def act(self, model: str, action: str, now: float) -> dict[str, Any]:
        """Run one of `ACTIONS` on the model's rollout; return its status."""
        if action not in self.ACTIONS:
            raise ValueError(f"unknown action {action!r}: one of {', '.join(self.ACTIONS)}")
        getattr(self, action)(model, now)
        return self._states[model].status()

    # -- output --------------------------------------------------------------------------

    def _traffic(self, s: State) -> dict[str, int]:
        traffic = dict.fromkeys(s.file_traffic, 0)
        traffic[s.spec.baseline] = 100 - s.canary_weight
        traffic[s.spec.canary] = s.canary_weight
        return traffic

    def overrides(self) -> dict[str, Override]:
        """The weights wanted per model; models without an entry follow the file."""
        out = {}
        for name, s in self._states.items():
            if s.hands_off or s.detached:
                continue
            mirror = None
            if s.phase == "shadowing" and s.spec.shadow is not None:
                mirror = (s.spec.canary, s.spec.shadow.percent)
            out[name] = Override(self._traffic(s), mirror)
        return out

    def apply(self, config: RoutingConfig) -> RoutingConfig:
        """`config` with the overrides in place, for translation."""
        overrides = self.overrides()
        models = []
        for m in config.models:
            o = overrides.get(m.name)
            if o is not None:
                shadow = Shadow(*o.mirror) if o.mirror else m.shadow
                m = replace(m, traffic=tuple(o.traffic.items()), shadow=shadow)
            models.append(m)
        return replace(config, models=tuple(models))

    def shadowing(self) -> list[tuple[str, Rollout]]:
        """The models whose canary is in its shadow phase, with their rollout."""
        return [(n, s.spec) for n, s in self._states.items() if s.phase == "shadowing"]

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: s.status() for name, s in sorted(self._states.items())}
