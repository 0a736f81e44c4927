"""Where a prediction runs: on the event loop when the model's recent predictions are cheap
and the request is small, else in a prediction thread (`ServedModel.predict`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from model_servers.metrics import ServerMetrics
from model_servers.protocol import InferenceRequest
from model_servers.registry import INLINE_PREDICT_SECONDS, ServedModel
from model_servers.repository import LoadedModel


class Recorder:
    """A runtime that answers its input and records the thread of each prediction."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds  # how long a prediction takes
        self.threads: list[int] = []

    def predict(self, inputs, requested):
        self.threads.append(threading.get_ident())
        if self.seconds:
            time.sleep(self.seconds)
        return {"y": inputs["x"]}


def served(runtime: Recorder) -> ServedModel:
    metrics = ServerMetrics().for_model("m", "1")
    return ServedModel(LoadedModel("m", "1", runtime), metrics, None, {})  # type: ignore[arg-type]


REQUEST = InferenceRequest({"x": np.ones((1, 2))}, None)


async def predict_n(model: ServedModel, n: int, small: bool = True) -> None:
    with ThreadPoolExecutor(1) as executor:
        for _ in range(n):
            outputs = await model.predict(REQUEST, executor, small=small)
            assert outputs["y"].tolist() == [[1.0, 1.0]]


async def test_cheap_predictions_move_onto_the_event_loop_after_the_first():
    runtime = Recorder()
    await predict_n(served(runtime), 5)
    loop = threading.get_ident()
    assert runtime.threads[0] != loop  # not measured yet: a prediction thread
    assert runtime.threads[1:] == [loop] * 4


async def test_slow_predictions_and_large_requests_stay_off_the_event_loop():
    slow = Recorder(seconds=2 * INLINE_PREDICT_SECONDS)
    await predict_n(served(slow), 5)
    cheap = Recorder()
    await predict_n(served(cheap), 5, small=False)
    loop = threading.get_ident()
    assert loop not in slow.threads and loop not in cheap.threads


async def test_a_model_that_turns_slow_leaves_the_event_loop_at_once():
    runtime = Recorder()
    model = served(runtime)
    await predict_n(model, 3)
    runtime.seconds = 2 * INLINE_PREDICT_SECONDS
    await predict_n(model, 1)  # on the loop: it was cheap until now
    runtime.seconds = 0.0
    await predict_n(model, 5)  # back in a thread until its cost has decayed
    loop = threading.get_ident()
    assert runtime.threads[3] == loop
    assert loop not in runtime.threads[4:9]
