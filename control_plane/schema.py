"""JSON Schema of the routing YAML, for editors and external checks.

It mirrors the rules in `config.py`; cross-field rules (a traffic or shadow version
must exist, not all weights zero) can only be checked by `infergate validate`.
"""

from __future__ import annotations

from typing import Any

from control_plane.config import HEADER_RE, NAME_RE

_NAME = NAME_RE.pattern
_ENDPOINT = {
    "type": "string",
    "pattern": r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|[0-9a-fA-F:]+):\d{1,5}$",
    "description": "ip:port of a model server (an IP address, not a host name)",
}
_DURATION = {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m)$"}


def routing_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) for a routing file."""
    version = {
        "type": "object",
        "additionalProperties": False,
        "required": ["endpoints"],
        "properties": {"endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    }
    model = {
        "type": "object",
        "additionalProperties": False,
        "required": ["versions"],
        "properties": {
            "versions": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": _NAME},
                "additionalProperties": version,
            },
            "traffic": {
                "type": "object",
                "description": "weight per version; 0 means no request at all",
                "minProperties": 1,
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "shadow": {
                "type": "object",
                "additionalProperties": False,
                "required": ["version", "percent"],
                "properties": {
                    "version": {"type": "string", "pattern": _NAME},
                    "percent": {"type": "number", "minimum": 0, "maximum": 100},
                },
            },
            "pin_header": {"type": "string", "pattern": HEADER_RE.pattern},
            "timeout": _DURATION,
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "infergate routing config",
        "type": "object",
        "additionalProperties": False,
        "required": ["models"],
        "properties": {
            "listen": _ENDPOINT,
            "models": {
                "type": "object",
                "propertyNames": {"pattern": _NAME},
                "additionalProperties": model,
            },
        },
    }
