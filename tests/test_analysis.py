"""Canary vs baseline checks on fixed numbers, and shadow answer comparison."""

from __future__ import annotations

import numpy as np

from control_plane.analysis import analyse, compare_outputs
from control_plane.config import Rollout, RolloutShadow
from control_plane.telemetry import IntervalStats as W

RULES = Rollout(canary="v2", baseline="v1", max_p99=0.2)


def window(n: int, errors: int, scale: float, seed: int) -> W:
    rng = np.random.default_rng(seed)
    return W(n, errors, tuple(rng.lognormal(np.log(scale), 0.3, n)))


def checks(result) -> dict[str, bool]:
    return {c.name: c.passed for c in result.checks}


def test_sampled_windows_are_tested_on_the_logged_counts_not_the_scaled_ones():
    # 25 logged requests at a sampling fraction of 1/40, one of them failed: ~1000 requests
    # and ~40 errors. 1 in 25 is no evidence of an error rate above 1%; 40 in 1000 would be.
    canary = W(1000, 40, (0.05,) * 25, sampled_requests=25, sampled_errors=1)
    baseline = W(9000, 0, (0.05,) * 225, sampled_requests=225, sampled_errors=0)
    result = analyse(canary, baseline, RULES)
    assert checks(result)["error_rate"] and checks(result)["errors_vs_baseline"]
    d = result.to_dict()["canary"]
    assert (d["requests"], d["errors"], d["sampled"], d["sampled_errors"]) == (1000, 40, 25, 1)
    assert "1 errors in 25 requests logged (of ~1000)" in result.checks[0].reason
    unsampled = analyse(W(1000, 40, (0.05,) * 1000), W(9000, 0, (0.05,) * 9000), RULES)
    assert not checks(unsampled)["error_rate"]


def test_same_distribution_passes_and_records_the_numbers():
    result = analyse(window(300, 1, 0.05, 1), window(3000, 8, 0.05, 2), RULES)
    assert result.passed, [c.reason for c in result.checks]
    assert checks(result) == dict.fromkeys(
        ["error_rate", "errors_vs_baseline", "p99", "latency_vs_baseline"], True
    )
    d = result.to_dict()
    assert d["canary"]["requests"] == 300 and d["baseline"]["errors"] == 8
    assert d["canary"]["p99"] > 0.05 and all(c["p_value"] is not None for c in d["checks"])


def test_errors_fail_both_error_checks_with_numbers_in_the_reason():
    result = analyse(window(200, 10, 0.05, 1), window(2000, 2, 0.05, 2), RULES)
    assert checks(result)["error_rate"] is False and checks(result)["errors_vs_baseline"] is False
    reasons = " ".join(c.reason for c in result.failed)
    assert "10 errors in 200 requests (5.00%) is above the 1.00% limit" in reasons
    assert "canary 5.00% vs baseline 0.10% errors: canary fails more" in reasons


def test_noise_near_the_absolute_limit_is_not_a_failure():
    # 2 errors in 100 is 2% observed, but not evidence that the rate exceeds 1%
    result = analyse(window(100, 2, 0.05, 1), window(1000, 20, 0.05, 2), RULES)
    assert checks(result)["error_rate"] is True


def test_slow_canary_fails_latency_checks_but_a_small_slowdown_does_not():
    slow = analyse(window(200, 0, 0.15, 1), window(2000, 0, 0.05, 2), RULES)
    assert checks(slow)["latency_vs_baseline"] is False and checks(slow)["p99"] is False
    # 10% slower is significant with this many samples, yet within max_p99_ratio 1.5
    mild = analyse(window(20000, 0, 0.055, 1), window(20000, 0, 0.05, 2), RULES)
    latency = next(c for c in mild.checks if c.name == "latency_vs_baseline")
    assert latency.passed and latency.p_value < 0.01


def test_no_baseline_traffic_skips_the_comparisons():
    result = analyse(window(200, 0, 0.05, 1), W(0, 0, ()), RULES)
    assert result.passed
    assert "no baseline" in " ".join(c.reason for c in result.checks)


TOL = RolloutShadow(rtol=1e-5, atol=1e-6)


def out(name, datatype, data, shape=None):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def test_outputs_compare_floats_within_tolerance_and_the_rest_exactly():
    a = [out("probs", "FP32", [0.1, 0.9]), out("label", "INT64", [1]), out("ok", "BOOL", [True])]
    close = [out("label", "INT64", [1]), out("probs", "FP32", [0.1000001, 0.9]), a[2]]
    assert compare_outputs(a, close, TOL) is None
    far = [out("probs", "FP32", [0.11, 0.89]), a[1], a[2]]
    assert "probs: values differ beyond rtol" in compare_outputs(a, far, TOL)
    assert (
        compare_outputs(a, [a[0], out("label", "INT64", [2]), a[2]], TOL) == "label: values differ"
    )
    text = [out("t", "BYTES", ["cat"])]
    assert compare_outputs(text, [out("t", "BYTES", ["cat "])], TOL) == "t: values differ"
    assert "datatype" in compare_outputs(a, [out("probs", "FP64", [0.1, 0.9]), a[1], a[2]], TOL)
    assert "output names differ" in compare_outputs(a, a[:2], TOL)
