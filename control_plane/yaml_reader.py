"""Read values out of a PyYAML node tree, keeping each value's position for errors."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


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


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def field_kind(default: Any) -> str:
    """How a policy field is written in YAML, from the type of its default value: "bool",
    "int" (non-negative), "duration" (500ms, 30s, 2m), "names" (a list of strings) or "str".
    `Reader.block` reads by it and `schema.py` describes by it."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "duration"
    if isinstance(default, tuple):
        return "names"
    return "str"


_LOADER = yaml.SafeLoader("")


@functools.lru_cache(maxsize=65536)
def _scalar_value(tag: str, value: str) -> Any:
    """A scalar's value: the same (resolved tag, text) is always the same immutable value,
    so a save that re-parses 1,000 models constructs only what changed."""
    constructors = _LOADER.yaml_constructors
    construct = constructors.get(tag) or constructors[None]
    return construct(_LOADER, yaml.ScalarNode(tag, value))


class Reader:
    """Walks a PyYAML node tree, converting values and collecting problems."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[Problem] = []

    def fail(self, node: yaml.Node, fieldname: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(Problem(self.path, mark.line + 1, mark.column + 1, fieldname, message))

    def scalar(self, node: yaml.Node, fieldname: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, fieldname, "expected a single value, not a list or mapping")
            return None
        return _scalar_value(node.tag, node.value)

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

    def duration(self, node: yaml.Node, fieldname: str) -> float | None:
        value = self.scalar(node, fieldname)
        match = DURATION_RE.match(str(value)) if isinstance(value, str) else None
        if not match or float(match.group(1)) <= 0:
            self.fail(node, fieldname, f"{value!r} is not a positive duration like 500ms, 30s, 2m")
            return None
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]

    def checked(self, node: yaml.Node, fieldname: str, ok: Callable[[Any], bool], what: str) -> Any:
        """A single value for which `ok` holds; otherwise a problem ("must be `what`") and None."""
        value = self.scalar(node, fieldname)
        if not ok(value):
            self.fail(node, fieldname, f"must be {what}, got {value!r}")
            return None
        return value

    def names(self, node: yaml.Node, fieldname: str) -> tuple[str, ...] | None:
        items = [self.scalar(n, fieldname) for n in self.sequence(node, fieldname)]
        if not all(isinstance(i, str) for i in items):
            self.fail(node, fieldname, "must be a list of names")
            return None
        return tuple(items)

    def block(self, node: yaml.Node, where: str, base: Any) -> Any:
        """Override fields of the frozen dataclass `base` from a mapping, each value read by
        the `field_kind` of the field's value in `base`. Returns `base` unchanged where a
        value is invalid."""
        readers: dict[str, Callable[[yaml.Node, str], Any]] = {
            "bool": lambda n, f: self.checked(n, f, _is_bool, "true or false"),
            "int": lambda n, f: self.checked(n, f, _is_count, "a non-negative integer"),
            "duration": self.duration,
            "names": self.names,
            "str": lambda n, f: self.checked(n, f, lambda v: isinstance(v, str), "a string"),
        }
        keys = self.mapping(node, where, {f.name for f in fields(base)})
        changes: dict[str, Any] = {}
        for key, (_, value_node) in keys.items():
            value = readers[field_kind(getattr(base, key))](value_node, f"{where}.{key}")
            if value is not None:
                changes[key] = value
        return replace(base, **changes)
