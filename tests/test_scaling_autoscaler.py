"""The autoscaler's rules, driven with a fake clock (no processes)."""

from __future__ import annotations

from dataclasses import replace

from control_plane.autoscaler import Scaler
from control_plane.config import Autoscale

SPEC = Autoscale(min=1, max=5, target_concurrency=4, stabilization=30, idle=60)


def feed(scaler: Scaler, start: float, seconds: float, concurrency: float, step: float = 1.0):
    t = start
    while t < start + seconds:
        scaler.observe(t, concurrency)
        t += step
    return t


def test_desired_is_concurrency_over_target_clamped():
    scaler = Scaler(SPEC)
    t = feed(scaler, 0, 60, 10)
    assert scaler.decide(t, ready=3).desired == 3  # ceil(10 / 4)
    t = feed(scaler, t, 60, 100)
    d = scaler.decide(t, ready=5)
    assert d.desired == 5 and "clamped to [1, 5]" in d.reason
    assert "concurrency 100.00 over 60s" in d.reason and "target 4" in d.reason


def test_panic_scales_up_at_once_and_never_down():
    scaler = Scaler(SPEC)
    t = feed(scaler, 0, 60, 1)
    assert scaler.decide(t, ready=1).desired == 1
    t = feed(scaler, t, 6, 16)  # the short window exceeds 2 x capacity (8)
    d = scaler.decide(t, ready=1)
    assert d.panic and d.desired == 4, d.reason  # the stable window alone would say 1
    t = feed(scaler, t, 3, 0)  # the load drops: no scale-down while panicking
    d = scaler.decide(t, ready=4)
    assert d.panic and d.desired == 4, d.reason


def test_scale_down_waits_the_stabilization_window():
    scaler = Scaler(replace(SPEC, window=10))
    t = feed(scaler, 0, 20, 12)
    assert scaler.decide(t, ready=3).desired == 3
    t = feed(scaler, t, 12, 0.5)  # the stable window now says 1
    downs = []
    for _ in range(40):
        scaler.observe(t, 0.5)
        downs.append((t, scaler.decide(t, ready=3).desired))
        t += 1
    first_low = next(at for at, d in downs if d == 1)
    assert all(d == 3 for at, d in downs if at < first_low)
    assert first_low - downs[0][0] >= 30 - 12  # 30 s after the stable window dropped


def test_scale_to_zero_after_the_idle_window_only():
    scaler = Scaler(Autoscale(0, 3, 2, stabilization=5, idle=20, window=10))
    scaler.observe(0, 1, requests=1)
    assert scaler.decide(0, ready=0).desired == 1
    t = feed(scaler, 1, 15, 0)
    d = scaler.decide(t, ready=1)
    assert d.desired == 1 and "keep one" in d.reason  # 15 s idle < 20 s
    t = feed(scaler, t, 10, 0)
    assert scaler.decide(t, ready=1).desired == 0
