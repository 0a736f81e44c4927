"""What every model runtime is: the `Runtime` protocol, its tensor type and its load error.

Every runtime validates a request (`validate`, raising ProtocolError(400)) separately from
running it (`predict`), so the batcher can reject one bad request before merging the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

Tensors = dict[str, np.ndarray]


class ModelLoadError(RuntimeError):
    """A model version that exists but cannot be loaded."""


class Runtime(Protocol):
    """What the server needs from a loaded model."""

    platform: str

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        """OIP `inputs` and `outputs` tensor metadata."""
        ...

    def validate(self, inputs: Tensors, requested: Sequence[str] | None) -> None:
        """Raise ProtocolError(400) unless `predict` can run on these inputs."""
        ...

    def predict(self, inputs: Tensors, requested: Sequence[str] | None) -> Tensors:
        """Outputs for validated inputs; the requested names, or the default outputs."""
        ...
