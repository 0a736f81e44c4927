"""Global quotas: Envoy's rate limit service (`envoy.service.ratelimit.v3`), counting per
consumer and model in fixed windows, shared by every Envoy of the control plane.

Each request's descriptor says what to count and the budget (`translate_limits.py`):
`model`, `quota` (`requests/seconds`) and `consumer`. Windows start at multiples of their
length on the injected clock (wall time by default), so an hourly quota renews on the hour.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
Key = tuple[str, str, int]  # model, consumer, window length


class QuotaCounter:
    """Requests per (model, consumer, window length) in the current window."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.counts: dict[Key, tuple[int, int]] = {}  # key -> (window index, count)

    def take(self, model: str, consumer: str, limit: int, seconds: int, hits: int = 1) -> float:
        """Count `hits` requests; 0.0 if they fit the window's `limit`, else the seconds
        until the window ends (nothing is counted then)."""
        now = self.clock()
        window = math.floor(now / seconds)
        key = (model, consumer, seconds)
        seen, count = self.counts.get(key, (window, 0))
        if seen != window:
            count = 0
        if count + hits > limit:
            self.counts[key] = (window, count)
            return (window + 1) * seconds - now
        self.counts[key] = (window, count + hits)
        return 0.0

    def used(self, model: str, consumer: str, seconds: int) -> int:
        """Requests counted in the current window."""
        window, count = self.counts.get((model, consumer, seconds), (None, 0))
        return count if window == math.floor(self.clock() / seconds) else 0


class QuotaServer:
    """grpcio handler for RateLimitService.ShouldRateLimit over a QuotaCounter."""

    def __init__(self, counter: QuotaCounter):
        self.counter = counter

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            RLS_SERVICE,
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    self.should_rate_limit,
                    request_deserializer=RateLimitRequest.FromString,
                    response_serializer=RateLimitResponse.SerializeToString,
                )
            },
        )

    async def should_rate_limit(self, request: RateLimitRequest, context) -> RateLimitResponse:
        return self.decide(request)

    def decide(self, request: RateLimitRequest) -> RateLimitResponse:
        """OK, or OVER_LIMIT with `retry-after` (seconds until the window ends) when any
        descriptor is over its quota. Descriptors without a quota are OK."""
        hits = request.hits_addend or 1
        response = RateLimitResponse(overall_code=RateLimitResponse.OK)
        wait = 0.0
        for descriptor in request.descriptors:
            entries = {e.key: e.value for e in descriptor.entries}
            status = response.statuses.add(code=RateLimitResponse.OK)
            if not {"model", "quota", "consumer"} <= entries.keys():
                continue
            limit, _, seconds = entries["quota"].partition("/")
            left = self.counter.take(
                entries["model"], entries["consumer"], int(limit), int(seconds), hits
            )
            if left:
                status.code = RateLimitResponse.OVER_LIMIT
                wait = max(wait, left)
        if wait:
            response.overall_code = RateLimitResponse.OVER_LIMIT
            response.response_headers_to_add.append(
                HeaderValue(key="retry-after", value=str(math.ceil(wait)))
            )
        return response
