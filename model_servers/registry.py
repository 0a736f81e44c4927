"""The model versions a server has loaded, and loading/unloading them at run time."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_servers.batching import Batcher
from model_servers.metrics import ModelMetrics, ServerMetrics
from model_servers.protocol import InferenceRequest, ProtocolError
from model_servers.repository import (
    LoadedModel,
    ModelNotFoundError,
    list_models,
    list_versions,
    load_model,
)
from model_servers.runtime_base import ModelLoadError, Tensors
from model_servers.settings import Batching

# A prediction whose recent cost is below this runs on the event loop: handing it to a
# prediction thread and back costs about 0.2 ms of CPU (more than, say, a linear model's
# prediction); anything slower, or not yet measured, runs in a prediction thread.
INLINE_PREDICT_SECONDS = 0.0005
COST_DECAY = 0.9  # per prediction: the cost follows a slower one at once, a faster one slowly


def version_order(version: str) -> list[tuple[int, Any]]:
    """Natural order: v2 < v10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


@dataclass
class ServedModel:
    """A loaded version with its metrics, optional batcher and OIP model metadata."""

    model: LoadedModel
    metrics: ModelMetrics
    batcher: Batcher | None
    metadata: dict[str, Any]
    # seconds, of recent predictions; the threshold itself until measured (off the loop)
    predict_cost: float = INLINE_PREDICT_SECONDS

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth if self.batcher else 0

    async def predict(
        self, request: InferenceRequest, executor: Executor, small: bool = False
    ) -> Tensors:
        """Outputs for a validated request, batched when the model batches. A `small`
        request to a model whose predictions are cheap is predicted on the event loop."""
        try:
            if self.batcher is not None:
                return await self.batcher.predict(request.inputs, request.outputs)
            rows = next(iter(request.inputs.values())).shape[:1] or (1,)
            self.metrics.observe_batch(rows[0], 1)
            if small and self.predict_cost < INLINE_PREDICT_SECONDS:
                return self._timed_predict(request)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, self._timed_predict, request)
        except (ValueError, TypeError) as exc:  # estimators reject bad input this way
            raise ProtocolError(400, f"prediction failed: {exc}") from None

    def _timed_predict(self, request: InferenceRequest) -> Tensors:
        """Predict, and fold the time it took into `predict_cost` (wall time: in a thread
        it includes waits for the GIL, which only keeps a prediction off the loop)."""
        start = time.perf_counter()
        try:
            return self.model.runtime.predict(request.inputs, request.outputs)
        finally:
            took = time.perf_counter() - start
            self.predict_cost = max(took, self.predict_cost * COST_DECAY)


class ModelRegistry:
    """Loaded versions by model name; resolves request paths to a ServedModel."""

    def __init__(
        self,
        repository: Path | None,
        metrics: ServerMetrics,
        executor: Executor,
        batching: Batching | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.executor = executor
        self.batching = batching  # overrides every model's settings when set
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._failures: dict[tuple[str, str], str] = {}
        self._lock = asyncio.Lock()

    def add(self, model: LoadedModel) -> ServedModel | None:
        """Serve `model`, replacing a loaded copy of the same version; return the old copy."""
        metrics = self.metrics.for_model(model.name, model.version)
        batching = self.batching or model.settings.batching
        batcher = None
        if batching.enabled:
            batcher = Batcher(model.runtime, batching, self.executor, metrics.observe_batch)
            metrics.track_queue(lambda: batcher.queue_depth)
        metadata = {
            "name": model.name,
            "versions": [model.version],
            "platform": model.runtime.platform,
            **model.runtime.metadata(),
        }
        served = ServedModel(model, metrics, batcher, metadata)
        versions = self._models.setdefault(model.name, {})
        old = versions.get(model.version)
        versions[model.version] = served
        self._failures.pop((model.name, model.version), None)
        return old

    @property
    def served(self) -> list[ServedModel]:
        return [s for versions in self._models.values() for s in versions.values()]

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The loaded version named, or the newest loaded one; ProtocolError(404) if none."""
        versions = self._models.get(name)
        if not versions:
            raise ProtocolError(404, f"model '{name}' not found")
        if version is None:
            return versions[max(versions, key=version_order)]
        served = versions.get(version)
        if served is None:
            raise ProtocolError(404, f"version '{version}' of model '{name}' not found")
        return served

    async def load(self, name: str, version: str | None) -> list[str]:
        """Load (or reload) one version, or every version of `name`; return the versions."""
        repository = self._repository()
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                versions = [version] if version else list_versions(repository, name)
                if not versions:
                    raise ModelNotFoundError(f"model {name!r} has no versions")
                loaded = []
                for v in versions:
                    try:
                        loaded.append(
                            await loop.run_in_executor(None, load_model, repository, name, v)
                        )
                    except ModelLoadError as exc:
                        self._failures[(name, v)] = str(exc)
                        raise
            except ModelNotFoundError as exc:
                raise ProtocolError(404, str(exc)) from None
            except ModelLoadError as exc:
                raise ProtocolError(400, str(exc)) from None
            for model in loaded:
                old = self.add(model)
                if old is not None and old.batcher is not None:
                    await old.batcher.close()
        return versions

    async def unload(self, name: str, version: str | None) -> list[str]:
        """Stop serving one version, or every version of `name`; return the versions."""
        async with self._lock:
            versions = self._models.get(name, {})
            names = [version] if version else list(versions)
            if not names or any(v not in versions for v in names):
                raise ProtocolError(404, f"model '{name}' version {version or ''} is not loaded")
            for v in names:
                served = versions.pop(v)
                served.metrics.unregister()
                if served.batcher is not None:
                    await served.batcher.close()
            if not versions:
                self._models.pop(name, None)
        return names

    def index(self) -> list[dict[str, str]]:
        """Every version in the repository or loaded, with its state (repository extension)."""
        seen: set[tuple[str, str]] = set((s.model.name, s.model.version) for s in self.served)
        if self.repository is not None:
            for name in list_models(self.repository):
                seen.update((name, v) for v in list_versions(self.repository, name))
        rows = []
        for name, version in sorted(seen, key=lambda nv: (nv[0], version_order(nv[1]))):
            if version in self._models.get(name, {}):
                rows.append({"name": name, "version": version, "state": "READY", "reason": ""})
            else:
                reason = self._failures.get((name, version), "not loaded")
                rows.append(
                    {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
                )
        return rows

    async def close(self) -> None:
        """Finish the queued requests of every batcher."""
        for served in self.served:
            if served.batcher is not None:
                await served.batcher.close()

    def _repository(self) -> Path:
        if self.repository is None:
            raise ProtocolError(400, "this server has no model repository")
        return self.repository
