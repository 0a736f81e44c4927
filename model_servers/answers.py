"""A bounded in-memory log of the answers a model server gave, keyed by `x-request-id`.

A rollout controller on another host reads it (`GET /v2/answers`) to pair a primary's and a
shadow's answers to the same request. Off unless `--record-answers N`: then the newest N
answers are kept, and older ones dropped first when their outputs exceed the byte cap.
Outputs are kept as numpy arrays and turned into JSON only when read.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_servers.protocol import ProtocolError, datatype_of, encode_tensor
from model_servers.runtime_base import Tensors

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
SHADOW_SUFFIX = "-shadow"


def is_shadow(authority: str | None) -> bool:
    """Whether a Host/:authority is one Envoy rewrote for a mirrored request: it appends
    `-shadow` to the host (`127.0.0.1-shadow:8000` for `127.0.0.1:8000`)."""
    if not authority:
        return False
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return host.endswith(SHADOW_SUFFIX)


@dataclass(slots=True)  # not frozen: a frozen dataclass is 5x slower to create
class Answer:
    cursor: int
    request_id: str
    model: str
    version: str
    shadow: bool | None  # None: unknown (gRPC)
    time: float
    outputs: Tensors
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "request_id": self.request_id,
            "model": self.model,
            "version": self.version,
            "shadow": self.shadow,
            "time": self.time,
            "outputs": [_tensor_json(name, array) for name, array in self.outputs.items()],
        }


def _tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """The OIP JSON tensor; BYTES that are not UTF-8 as base64 strings, marked so."""
    try:
        return encode_tensor(name, array)
    except ProtocolError:
        data = [base64.b64encode(bytes(v)).decode() for v in array.reshape(-1).tolist()]
        return {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
            "data": data,
            "parameters": {"encoding": "base64"},
        }


def _size(array: np.ndarray) -> int:
    if array.dtype == object:
        return sum(len(v) if isinstance(v, bytes | str) else 8 for v in array.reshape(-1))
    return array.nbytes


class AnswerLog:
    """The newest `capacity` answers whose outputs total at most `max_bytes`.

    Every answer gets the next cursor (1, 2, ...). `epoch` is random per server start, so a
    reader sees a restart (its cursor then means nothing).
    """

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if capacity < 1 or max_bytes < 1:
            raise ValueError("the answer log needs a capacity and a byte cap of at least 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.epoch = secrets.token_hex(8)
        self._answers: deque[Answer] = deque()
        self._bytes = 0
        self._last = 0

    def add(
        self, request_id: str, model: str, version: str, shadow: bool | None, outputs: Tensors
    ) -> None:
        """Record one answer (copies of the arrays: a batch's outputs are views of one)."""
        kept = {name: array.copy() for name, array in outputs.items()}
        size = sum(_size(a) for a in kept.values()) + len(request_id)
        self._last += 1
        self._answers.append(
            Answer(self._last, request_id, model, version, shadow, time.time(), kept, size)
        )
        self._bytes += size
        while len(self._answers) > self.capacity or (
            self._bytes > self.max_bytes and len(self._answers) > 1
        ):
            self._bytes -= self._answers.popleft().size

    def since(self, cursor: int, limit: int) -> dict[str, Any]:
        """Up to `limit` answers after `cursor`, oldest first, and the cursor to ask next;
        `dropped` counts answers after `cursor` that are no longer kept."""
        first = self._answers[0].cursor if self._answers else self._last + 1
        start = max(cursor + 1, first)
        skip = start - first
        answers = [self._answers[i] for i in range(skip, min(skip + limit, len(self._answers)))]
        return {
            "epoch": self.epoch,
            "answers": [a.to_json() for a in answers],
            "next": answers[-1].cursor if answers else max(cursor, start - 1),
            "dropped": max(0, first - cursor - 1),
        }

    def lookup(self, request_ids: set[str]) -> dict[str, Any]:
        """The kept answers to these request ids (a shadowed id has one per server)."""
        answers = [a.to_json() for a in self._answers if a.request_id in request_ids]
        return {"epoch": self.epoch, "answers": answers}
