"""The quota counter and the rate limit service's decisions, with an injected clock."""

from __future__ import annotations

from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from control_plane.quota import QuotaCounter, QuotaServer
from tests.fake_clock import FakeClock


def test_counts_per_consumer_and_model_until_the_window_ends():
    clock = FakeClock(7200.0)
    counter = QuotaCounter(clock)
    assert [counter.take("iris", "alice", 3, 60) for _ in range(3)] == [0.0, 0.0, 0.0]
    clock.now += 15
    assert counter.take("iris", "alice", 3, 60) == 45.0  # over: wait for the next minute
    assert counter.used("iris", "alice", 60) == 3  # a rejected request is not counted
    assert counter.take("iris", "bob", 3, 60) == 0.0  # another consumer
    assert counter.take("wine", "alice", 3, 60) == 0.0  # another model
    clock.now += 45  # the next window
    assert counter.used("iris", "alice", 60) == 0
    assert counter.take("iris", "alice", 3, 60) == 0.0


def test_hits_addend_counts_several_requests():
    counter = QuotaCounter(FakeClock(7200.0))
    assert counter.take("iris", "alice", 5, 60, hits=4) == 0.0
    assert counter.take("iris", "alice", 5, 60, hits=2) > 0
    assert counter.take("iris", "alice", 5, 60, hits=1) == 0.0


def request(consumer: str, quota: str = "2/60") -> RateLimitRequest:
    entries = [("model", "iris"), ("quota", quota), ("consumer", consumer)]
    return RateLimitRequest(
        domain="infergate",
        descriptors=[
            RateLimitDescriptor(
                entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
            )
        ],
    )


def test_over_the_quota_the_service_says_over_limit_with_retry_after():
    clock = FakeClock(7210.0)
    server = QuotaServer(QuotaCounter(clock))
    codes = [server.decide(request("alice")).overall_code for _ in range(3)]
    assert codes == [RateLimitResponse.OK, RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT]
    over = server.decide(request("alice"))
    assert [(h.key, h.value) for h in over.response_headers_to_add] == [("retry-after", "50")]
    assert over.statuses[0].code == RateLimitResponse.OVER_LIMIT
    assert server.decide(request("bob")).overall_code == RateLimitResponse.OK


def test_descriptors_without_a_quota_are_ok():
    server = QuotaServer(QuotaCounter(FakeClock(7200.0)))
    other = RateLimitRequest(
        descriptors=[RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="x", value="y")])]
    )
    assert server.decide(other).overall_code == RateLimitResponse.OK
