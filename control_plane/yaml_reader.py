"""Read values out of a PyYAML node tree, keeping each value's position for errors."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Problem:
    """One validation error at a position in the file."""

    path: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.column}"
        prefix = f"{where}: {self.field}" if self.field else where
        return f"{prefix}: {self.message}"


def parse_endpoint(value: object) -> Endpoint:
    """`ip:port` (IPv6 in brackets) to an Endpoint; ValueError says what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'ip:port', got {value!r}")
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        hint = " (use 127.0.0.1)" if host == "localhost" else ""
        raise ValueError(f"{value!r} is not 'ip:port' with an IP address{hint}") from None
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} needs a port between 1 and 65535")
    return Endpoint(host, int(port_text))


class ConfigError(Exception):
    """The file is not a valid routing config; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Reader:
    """Walks a PyYAML node tree, converting values and collecting problems."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, fieldname: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(self.path, mark.line + 1, mark.column + 1, fieldname, message))

    def scalar(self, node: yaml.Node, fieldname: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, fieldname, "expected a single value, not a list or mapping")
            return None
        return self._constructor.construct_object(node)

    def mapping(
        self, node: yaml.Node, fieldname: str, allowed: set[str] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Return {key: (key_node, value_node)}; report non-mappings, duplicates, unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, fieldname, "expected a mapping")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, fieldname)
            name = f"{fieldname}.{key}" if fieldname else str(key)
            if not isinstance(key, str):
                self.fail(key_node, fieldname, f"key {key!r} must be a string")
            elif key in out:
                self.fail(key_node, name, "duplicate key")
            elif allowed is not None and key not in allowed:
                expected = ", ".join(sorted(allowed))
                self.fail(key_node, name, f"unknown key {key!r} (expected one of: {expected})")
            else:
                out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, fieldname: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, fieldname, "expected a list")
            return []
        return list(node.value)

    def name(self, node: yaml.Node, fieldname: str, what: str) -> str | None:
        value = self.scalar(node, fieldname)
        if not isinstance(value, str) or not NAME_RE.match(value):
            self.fail(
                node,
                fieldname,
                f"{what} name {value!r} must be lowercase letters, digits, '-' or '_' "
                "(at most 63, starting and ending with a letter or digit)",
            )
            return None
        return value

    def endpoint(self, node: yaml.Node, fieldname: str) -> Endpoint | None:
        value = self.scalar(node, fieldname)
        try:
            return parse_endpoint(value)
        except ValueError as exc:
            self.fail(node, fieldname, str(exc))
            return None

    def duration(self, node: yaml.Node, fieldname: str) -> float | None:
        value = self.scalar(node, fieldname)
        match = DURATION_RE.match(str(value)) if isinstance(value, str) else None
        if not match or float(match.group(1)) <= 0:
            self.fail(node, fieldname, f"{value!r} is not a positive duration like 500ms, 30s, 2m")
            return None
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]

    def block(self, node: yaml.Node, where: str, base: Any) -> Any:
        """Override fields of the frozen dataclass `base` from a mapping, each value checked by
        the type of the field's value in `base`: int (>= 0), float (a duration), str, tuple of
        str. Returns `base` unchanged where a value is invalid."""
        keys = self.mapping(node, where, {f.name for f in fields(base)})
        changes: dict[str, Any] = {}
        for key, (_, value_node) in keys.items():
            fieldname = f"{where}.{key}"
            current = getattr(base, key)
            if isinstance(current, bool):
                value = self.scalar(value_node, fieldname)
                if not isinstance(value, bool):
                    self.fail(value_node, fieldname, f"must be true or false, got {value!r}")
                    continue
            elif isinstance(current, int):
                value = self.scalar(value_node, fieldname)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    self.fail(
                        value_node, fieldname, f"must be a non-negative integer, got {value!r}"
                    )
                    continue
            elif isinstance(current, float):
                value = self.duration(value_node, fieldname)
                if value is None:
                    continue
            elif isinstance(current, tuple):
                items = [self.scalar(n, fieldname) for n in self.sequence(value_node, fieldname)]
                if not all(isinstance(i, str) for i in items):
                    self.fail(value_node, fieldname, "must be a list of names")
                    continue
                value = tuple(items)
            else:
                value = self.scalar(value_node, fieldname)
                if not isinstance(value, str):
                    self.fail(value_node, fieldname, f"must be a string, got {value!r}")
                    continue
            changes[key] = value
        return replace(base, **changes)
