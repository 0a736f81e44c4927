"""JSON Schema of the routing YAML, for editors and external checks.

It mirrors the rules in `config.py`; cross-field rules (a traffic, shadow or canary version
must exist, not all weights zero, a canary that is not the baseline, increasing steps,
autoscale min <= max) can only be checked by `infergate validate`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from control_plane.config import (
    HEADER_RE,
    NAME_RE,
    PRIORITIES,
    QUOTA_FAILURE_MODES,
    RATE_UNITS,
    ROLLOUT_NUMBERS,
    SHADOW_NUMBERS,
    SIZE_UNITS,
)
from control_plane.resilience import LOAD_BALANCING, RETRY_CONDITIONS, Resilience
from control_plane.yaml_reader import field_kind

_NAME = NAME_RE.pattern
_ENDPOINT = {
    "type": "string",
    "pattern": r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]|[0-9a-fA-F:]+):\d{1,5}$",
    "description": "ip:port of a model server (an IP address, not a host name)",
}


def _listen(what: str) -> dict:
    """An ip:port where Envoy listens (the same syntax as a model server's endpoint)."""
    return {**_ENDPOINT, "description": f"ip:port (an IP address) where Envoy serves {what}"}


_DURATION = {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m)$"}


def _block(instance: Any) -> dict[str, Any]:
    """Schema of a policy dataclass: each field as `Reader.block` reads it."""
    kinds = {
        "bool": {"type": "boolean"},
        "int": {"type": "integer", "minimum": 0},
        "duration": _DURATION,
        "names": {"type": "array", "items": {"enum": sorted(RETRY_CONDITIONS)}},
        "str": {"type": "string"},
    }
    props = {f.name: kinds[field_kind(getattr(instance, f.name))] for f in fields(instance)}
    return {"type": "object", "additionalProperties": False, "properties": props}


def _upstream_tls() -> dict[str, Any]:
    """Mutual TLS from Envoy to the model servers (docs/upstream-tls.md)."""
    pem = {"type": "string", "minLength": 1, "description": "PEM file, relative to this file"}
    keys = ("cert", "key", "ca", "server_cert", "server_key")
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["cert", "key", "ca"],
        "dependentRequired": {"server_cert": ["server_key"], "server_key": ["server_cert"]},
        "properties": {key: pem for key in keys},
    }


def _resilience() -> dict[str, Any]:
    base = Resilience()
    props = {
        f.name: _block(getattr(base, f.name)) for f in fields(base) if f.name != "load_balancing"
    }
    props["health_check"] = {"oneOf": [props["health_check"], {"const": False}]}
    props["load_balancing"] = {"enum": list(LOAD_BALANCING)}
    return {"type": "object", "additionalProperties": False, "properties": props}


def _numbers(rules: dict[str, tuple[float, float, bool]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (low, high, integer) in rules.items():
        out[key] = {"type": "integer" if integer else "number", "minimum": low}
        if high != float("inf"):
            out[key]["maximum"] = high
    return out


def _rollout() -> dict[str, Any]:
    shadow = {
        "type": "object",
        "additionalProperties": False,
        "properties": _numbers(SHADOW_NUMBERS),
    }
    props = {
        "canary": {"type": "string", "pattern": _NAME},
        "shadow": shadow,
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "integer", "minimum": 1, "maximum": 100},
            "description": "canary weight per step, increasing",
        },
        "interval": _DURATION,
        "max_p99": _DURATION,
        "hold_timeout": _DURATION,
        **_numbers(ROLLOUT_NUMBERS),
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["canary"],
        "properties": props,
    }


def _consumers() -> dict[str, Any]:
    """The `consumers` block (the files it names are checked by `infergate validate`)."""
    text = {"type": "string", "minLength": 1}
    jwt = {
        "type": "object",
        "additionalProperties": False,
        "required": ["issuer", "jwks_file"],
        "properties": {
            "issuer": text,
            "audiences": {"type": "array", "items": text},
            "jwks_file": {**text, "description": "a JWKS (JSON), relative to this file"},
            "consumer_claim": {**text, "description": "the claim naming the consumer (sub)"},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "anyOf": [{"required": ["keys_file"]}, {"required": ["jwt"]}],
        "properties": {
            "keys_file": {**text, "description": "'consumer: key' lines, relative to this file"},
            "jwt": jwt,
            "priority": {"type": "object", "additionalProperties": {"enum": list(PRIORITIES)}},
        },
    }


_ACCESS = {
    "description": "who may call the model (absent: any valid consumer)",
    "oneOf": [
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["consumers"],
            "properties": {"consumers": {"type": "array", "items": {"type": "string"}}},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["public"],
            "properties": {"public": {"const": True}},
        },
    ],
}


def _limits() -> dict[str, Any]:
    """A model's limits per consumer (a zero rate is only caught by `infergate validate`)."""
    rate = {
        "type": "string",
        "pattern": rf"^\d+\s*/\s*({'|'.join(RATE_UNITS)})$",
        "description": "requests per second, minute, hour or day: 50/s, 10000/h",
    }

    def per_consumer(**extra: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": ["per_consumer"],
            "properties": {"per_consumer": rate, **extra},
        }

    size = {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": rf"^\d+\s*({'|'.join(SIZE_UNITS)})?$"},
        ],
        "description": "bytes, or with a unit: 1MiB, 512KiB",
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "rate": per_consumer(burst={"type": "integer", "minimum": 1}),
            "quota": per_consumer(),
            "max_body": size,
            "low_priority_requests": {"type": "integer", "minimum": 1},
        },
    }


def routing_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) for a routing file."""
    count = {"type": "integer", "minimum": 0}
    autoscale = {
        "type": "object",
        "additionalProperties": False,
        "description": "model servers that infergate run scales with load (min <= max)",
        "properties": {
            "min": count,
            "max": {"type": "integer", "minimum": 1},
            "target_concurrency": {"type": "number", "exclusiveMinimum": 0},
            "stabilization": _DURATION,
            "idle": _DURATION,
            "window": _DURATION,
        },
    }
    version = {
        "type": "object",
        "additionalProperties": False,
        "oneOf": [
            {
                "required": ["endpoints"],
                "not": {"anyOf": [{"required": ["replicas"]}, {"required": ["autoscale"]}]},
            },
            {
                "required": ["replicas"],
                "not": {"anyOf": [{"required": ["endpoints"]}, {"required": ["autoscale"]}]},
            },
            {
                "required": ["autoscale"],
                "not": {"anyOf": [{"required": ["endpoints"]}, {"required": ["replicas"]}]},
            },
        ],
        "properties": {
            "endpoints": {"type": "array", "items": _ENDPOINT},
            "grpc_endpoints": {"type": "array", "items": _ENDPOINT},
            "replicas": {**count, "description": "model servers that infergate run keeps"},
            "autoscale": autoscale,
        },
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
            "resilience": _resilience(),
            "grpc_listen": _listen("this model's KServe V2 gRPC API"),
            "rollout": _rollout(),
            "access": _ACCESS,
            "limits": _limits(),
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "infergate routing config",
        "type": "object",
        "additionalProperties": False,
        "required": ["models"],
        "properties": {
            "listen": _listen("the HTTP API of every model"),
            "resilience": _resilience(),
            "consumers": _consumers(),
            "upstream_tls": _upstream_tls(),
            "quota_service": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"on_failure": {"enum": list(QUOTA_FAILURE_MODES)}},
            },
            "models": {
                "type": "object",
                "propertyNames": {"pattern": _NAME},
                "additionalProperties": model,
            },
        },
    }
