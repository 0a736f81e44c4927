"""Which fraction of requests Envoys log: the sampling controller.

The fraction follows the fleet's measured request rate so that the logged rate (rate x
fraction) stays under `max_rate`: 1 while it fits, else the largest step of a ladder of
halvings that fits. Hysteresis keeps it from flapping: it drops at once when the logged
rate exceeds `max_rate`, and rises one step only when the doubled logged rate would stay
under `rise_below` x `max_rate` and the current step has held for `hold` seconds (the
window the rate is measured over must have seen it). Pure: time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence

# 1, 1/2, ..., 1/256: one access logger per step (access_log.py); 1/256 of the default
# max rate of 4,000/s covers a fleet of about a million requests/s.
LADDER: tuple[float, ...] = tuple(2.0**-k for k in range(9))


class SamplingController:
    def __init__(
        self,
        max_rate: float,
        ladder: Sequence[float] = LADDER,
        rise_below: float = 0.8,
        hold: float = 10.0,
    ):
        if not ladder or list(ladder) != sorted(ladder, reverse=True):
            raise ValueError("ladder: fractions from the largest down")
        self.max_rate = max_rate
        self.ladder = tuple(ladder)
        self.rise_below = rise_below
        self.hold = hold
        self.step = 0  # index into the ladder
        self.changed_at: float | None = None

    @property
    def fraction(self) -> float:
        return self.ladder[self.step]

    def update(self, rate: float, now: float) -> float:
        """The fraction to log at, given the fleet's request rate (scaled, requests/s)
        measured over the last `hold` seconds."""
        step = self.step
        if rate * self.ladder[step] > self.max_rate:
            while step + 1 < len(self.ladder) and rate * self.ladder[step] > self.max_rate:
                step += 1
        elif (
            step > 0
            and rate * self.ladder[step - 1] <= self.rise_below * self.max_rate
            and (self.changed_at is None or now - self.changed_at >= self.hold)
        ):
            step -= 1
        if step != self.step:
            self.step, self.changed_at = step, now
        return self.fraction
