"""Checks of request tensors and output names against declared tensor specs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_servers.protocol import ProtocolError, datatype_of
from model_servers.settings import TensorSpec


def check_inputs(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray]) -> None:
    """Raise ProtocolError(400) unless `inputs` match `specs` (no specs: anything goes)."""
    if not specs:
        return
    expected = {spec.name for spec in specs}
    if set(inputs) != expected:
        raise ProtocolError(400, f"inputs {sorted(inputs)} do not match {sorted(expected)}")
    for spec in specs:
        array = inputs[spec.name]
        if datatype_of(array) != spec.datatype:
            raise ProtocolError(
                400, f"input '{spec.name}' must be {spec.datatype}, got {datatype_of(array)}"
            )
        fits = len(array.shape) == len(spec.shape) and all(
            want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        )
        if not fits:
            raise ProtocolError(
                400, f"input '{spec.name}' has shape {list(array.shape)}, want {list(spec.shape)}"
            )


def check_outputs(available: Sequence[str], requested: Sequence[str] | None) -> None:
    """Raise ProtocolError(400) for requested outputs not in `available` (empty: unknown)."""
    unknown = [n for n in requested or () if available and n not in available]
    if unknown:
        raise ProtocolError(400, f"unknown outputs {unknown}; available: {sorted(available)}")


def select_outputs(outputs: dict[str, np.ndarray], requested: Sequence[str] | None) -> dict:
    """The requested subset of `outputs` (all when None); 400 for names the model lacks."""
    if not requested:
        return outputs
    check_outputs(list(outputs), requested)
    return {name: outputs[name] for name in dict.fromkeys(requested)}
