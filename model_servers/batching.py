"""Adaptive batching: concurrent requests for one model version merged into one predict call.

Requests wait in a queue while the model is busy. When it is free, the batcher takes the
oldest request plus every queued request with the same signature (input names, datatypes,
trailing dimensions and requested outputs), up to `max_batch_size` rows, waiting at most
`max_delay_ms` for the batch to fill. Inputs are concatenated along the first axis and the
outputs split back by each request's row count. If a merged call fails, each request of the
batch is rerun on its own, so only the requests that fail alone fail.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_servers.runtime_base import Runtime, Tensors
from model_servers.settings import Batching


@dataclass
class _Pending:
    inputs: Tensors
    requested: tuple[str, ...] | None
    rows: int
    key: Hashable
    future: asyncio.Future[Tensors] = field(repr=False)


def batch_key(inputs: Tensors, requested: Sequence[str] | None) -> Hashable:
    """Requests with equal keys can be concatenated along their first axis."""
    tensors = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))
    return tensors, tuple(requested) if requested else None


def batch_rows(inputs: Tensors) -> int | None:
    """The common first dimension of all inputs, or None if they cannot be batched."""
    firsts = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(firsts) != 1:
        return None
    (rows,) = firsts
    return rows


class Batcher:
    """Queues validated requests of one model version and runs them in batches."""

    def __init__(
        self,
        runtime: Runtime,
        batching: Batching,
        executor: Executor | None,
        on_batch: Callable[[int, int], None] = lambda rows, requests: None,
    ) -> None:
        self.runtime = runtime
        self.max_rows = batching.max_batch_size
        self.max_delay = batching.max_delay_ms / 1000
        self.executor = executor
        self.on_batch = on_batch
        self._waiting: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        return len(self._waiting)

    async def predict(self, inputs: Tensors, requested: Sequence[str] | None) -> Tensors:
        """Outputs for one validated request, computed in a batch with its neighbours."""
        rows = batch_rows(inputs)
        if rows is None:  # no common batch axis: run alone
            return await self._run(self.runtime.predict, inputs, requested)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="batcher")
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        req = tuple(requested) if requested else None
        self._waiting.append(_Pending(inputs, req, rows, batch_key(inputs, req), future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Run the queued requests, then stop the batching task."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._closing = False

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await asyncio.sleep(0)  # let requests that arrived together enqueue first
            deadline = loop.time() + self.max_delay
            while self._ready_rows() < self.max_rows and (left := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            try:
                await self._execute(batch)
            except Exception as exc:  # never leave a request waiting forever
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)

    def _ready_rows(self) -> int:
        key = self._waiting[0].key
        return sum(p.rows for p in self._waiting if p.key == key)

    def _take(self) -> list[_Pending]:
        """The oldest live request and the queued requests that fit into its batch."""
        batch: list[_Pending] = []
        rows = 0
        kept: deque[_Pending] = deque()
        for pending in self._waiting:
            if pending.future.done():  # the client went away
                continue
            fits = not batch or (
                pending.key == batch[0].key and rows + pending.rows <= self.max_rows
            )
            if fits:
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._waiting = kept
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        self.on_batch(sum(p.rows for p in batch), len(batch))
        run = self._predict_merged if len(batch) > 1 else self._predict_each
        try:
            results = await self._run(run, batch)
        except Exception:  # the merged call failed: find out which requests fail alone
            results = await self._run(self._predict_each, batch)
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _predict_merged(self, batch: list[_Pending]) -> list[Tensors]:
        names = list(batch[0].inputs)
        merged = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
        outputs = self.runtime.predict(merged, batch[0].requested)
        total = sum(p.rows for p in batch)
        if any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
            raise ValueError("outputs do not have the batch's first dimension")
        offsets = np.cumsum([p.rows for p in batch])[:-1]
        parts = {n: np.split(a, offsets) for n, a in outputs.items()}
        return [{n: parts[n][i] for n in outputs} for i in range(len(batch))]

    def _predict_each(self, batch: list[_Pending]) -> list[Tensors | Exception]:
        results: list[Tensors | Exception] = []
        for pending in batch:
            try:
                results.append(self.runtime.predict(pending.inputs, pending.requested))
            except Exception as exc:
                results.append(exc)
        return results
